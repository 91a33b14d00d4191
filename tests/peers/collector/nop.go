package main

// The Supervisor bootstraps the collector with a pipeline of `nop` components when it
// believes the collector lacks the service.AllowNoPipelines gate, which its feature-gate
// probe now and then concludes, so a collector it runs needs them (otelcol-contrib has
// them). The module proxy serves no nopreceiver at this release: this is the same thing,
// a receiver that receives nothing.

import (
	"context"

	"go.opentelemetry.io/collector/component"
	"go.opentelemetry.io/collector/consumer"
	"go.opentelemetry.io/collector/receiver"
)

type nopReceiver struct {
	component.StartFunc
	component.ShutdownFunc
}

func newNopReceiverFactory() receiver.Factory {
	return receiver.NewFactory(
		component.MustNewType("nop"),
		func() component.Config { return &struct{}{} },
		receiver.WithTraces(func(context.Context, receiver.Settings, component.Config, consumer.Traces) (receiver.Traces, error) {
			return nopReceiver{}, nil
		}, component.StabilityLevelStable),
		receiver.WithMetrics(func(context.Context, receiver.Settings, component.Config, consumer.Metrics) (receiver.Metrics, error) {
			return nopReceiver{}, nil
		}, component.StabilityLevelStable),
		receiver.WithLogs(func(context.Context, receiver.Settings, component.Config, consumer.Logs) (receiver.Logs, error) {
			return nopReceiver{}, nil
		}, component.StabilityLevelStable),
	)
}
