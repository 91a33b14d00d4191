// A real OpAMP agent for gitfleet's tests, built on @elastic/opamp-client-node.
//
// usage: node agent.mjs ENDPOINT TOKEN HOST SECONDS
//
// Connects over plain HTTP with the bearer token, heartbeats every second, and prints one
// JSON line per event: {"event":"started","instance_uid":...}, {"event":"config",
// "config_hash":...,"body":...} for each remote config (reported APPLIED), and
// {"event":"log","level":...,"message":...} for the client's warnings and errors.

import {randomUUID} from 'node:crypto';
import {createOpAMPClient, AgentCapabilities, RemoteConfigStatuses} from '@elastic/opamp-client-node';

const [endpoint, token, host, seconds] = process.argv.slice(2);
const emit = (fields) => process.stdout.write(JSON.stringify(fields) + '\n');
const hex = (bytes) => Buffer.from(bytes).toString('hex');
const log = (level) => (...args) =>
    emit({event: 'log', level, message: args.map((a) => (a instanceof Error ? a.message : typeof a === 'string' ? a : JSON.stringify(a))).join(' ')});

const instanceUid = randomUUID();
const client = createOpAMPClient({
    endpoint,
    headers: {Authorization: `Bearer ${token}`},
    instanceUid,
    heartbeatIntervalSeconds: 1,
    capabilities:
        AgentCapabilities.AgentCapabilities_AcceptsRemoteConfig |
        AgentCapabilities.AgentCapabilities_ReportsRemoteConfig,
    log: {trace() {}, debug() {}, info() {}, warn: log('warn'), error: log('error')},
    onMessage: ({remoteConfig}) => {
        if (!remoteConfig) {
            return;
        }
        const file = remoteConfig.config?.configMap?.[''];
        emit({
            event: 'config',
            config_hash: hex(remoteConfig.configHash),
            content_type: file?.contentType,
            body: file ? Buffer.from(file.body).toString('utf8') : null,
        });
        client.setRemoteConfigStatus({
            status: RemoteConfigStatuses.RemoteConfigStatuses_APPLIED,
            lastRemoteConfigHash: remoteConfig.configHash,
        });
    },
});
client.setAgentDescription({
    identifyingAttributes: {'service.name': 'cart', 'service.version': '2.0.1'},
    nonIdentifyingAttributes: {'host.name': host, 'os.type': 'linux', 'host.arch': 'arm64'},
});
emit({event: 'started', instance_uid: instanceUid});
client.start();
setTimeout(async () => {
    await client.shutdown();
}, Number(seconds) * 1000);
