#!/usr/bin/env python3
"""A real OpAMP agent for gitfleet's tests, built on opentelemetry-opamp-client.

usage: agent.py ENDPOINT TOKEN HOST SECONDS

Connects over plain HTTP with the bearer token, heartbeats every second, and prints one
JSON line per event: {"event": "started", "instance_uid": ...}, {"event": "config",
"config_hash": ..., "config": {...}} for each remote config it receives (it reports it
APPLIED), and {"event": "connect_failed", "error": ...}. Stops after SECONDS.
"""

import json
import sys
import time
import uuid

from opentelemetry._opamp.agent import OpAMPAgent
from opentelemetry._opamp.callbacks import OpAMPCallbacks
from opentelemetry._opamp.client import OpAMPClient
from opentelemetry._opamp.proto import opamp_pb2


def emit(**fields):
    print(json.dumps(fields), flush=True)


class Callbacks(OpAMPCallbacks):
    def on_message(self, agent, client, message):
        remote = message.remote_config
        if remote is None:
            return
        config = dict(client.decode_remote_config(remote))
        emit(event="config", config_hash=remote.config_hash.hex(), config=config)
        status = client.update_remote_config_status(
            remote_config_hash=remote.config_hash,
            status=opamp_pb2.RemoteConfigStatuses_APPLIED,
        )
        if status is not None:
            agent.send(payload=client.build_remote_config_status_response_message(status))

    def on_connect_failed(self, agent, client, error):
        emit(event="connect_failed", error=str(error))


def main():
    endpoint, token, host, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    client = OpAMPClient(
        endpoint=endpoint,
        headers={"Authorization": f"Bearer {token}"},
        agent_identifying_attributes={"service.name": "checkout", "service.version": "1.4.2"},
        agent_non_identifying_attributes={"host.name": host, "os.type": "linux", "host.arch": "amd64"},
    )
    emit(event="started", instance_uid=str(uuid.UUID(bytes=client._instance_uid)))
    agent = OpAMPAgent(interval=1, callbacks=Callbacks(), client=client, max_retries=1, initial_backoff=0.2)
    agent.start()
    time.sleep(seconds)
    agent.stop()


if __name__ == "__main__":
    main()
