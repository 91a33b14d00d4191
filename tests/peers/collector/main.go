// Program otelcol-contrib is the collector the gitfleet tests run under the real OpAMP
// Supervisor: upstream components at one release, built from source because release
// downloads cannot be fetched on the test machines. It holds what
// example-repo/configs/gateway.yaml uses, the opamp extension the Supervisor needs, and the
// nop components of the Supervisor's fallback bootstrap pipeline (nop.go).
package main

import (
	"os"

	"go.opentelemetry.io/collector/component"
	"go.opentelemetry.io/collector/confmap"
	"go.opentelemetry.io/collector/confmap/provider/envprovider"
	"go.opentelemetry.io/collector/confmap/provider/fileprovider"
	"go.opentelemetry.io/collector/confmap/provider/yamlprovider"
	"go.opentelemetry.io/collector/exporter"
	"go.opentelemetry.io/collector/exporter/debugexporter"
	"go.opentelemetry.io/collector/exporter/nopexporter"
	"go.opentelemetry.io/collector/exporter/otlpexporter"
	"go.opentelemetry.io/collector/exporter/otlphttpexporter"
	"go.opentelemetry.io/collector/extension"
	"go.opentelemetry.io/collector/otelcol"
	"go.opentelemetry.io/collector/processor"
	"go.opentelemetry.io/collector/processor/batchprocessor"
	"go.opentelemetry.io/collector/processor/memorylimiterprocessor"
	"go.opentelemetry.io/collector/receiver"
	"go.opentelemetry.io/collector/receiver/otlpreceiver"
	"go.opentelemetry.io/collector/service/telemetry/otelconftelemetry"

	"github.com/open-telemetry/opentelemetry-collector-contrib/extension/healthcheckextension"
	"github.com/open-telemetry/opentelemetry-collector-contrib/extension/opampextension"
	"github.com/open-telemetry/opentelemetry-collector-contrib/processor/resourceprocessor"
)

// version is set by the build (-ldflags "-X main.version=…") to the release line.
var version = "0.0.0-dev"

const (
	core    = "go.opentelemetry.io/collector/"
	contrib = "github.com/open-telemetry/opentelemetry-collector-contrib/"
)

// modules maps each factory's type (and deprecated alias) to its Go module and version, as
// the collector builder does, so that the opamp extension reports them as the components'
// code.namespace.
func modules[T component.Factory](factories map[component.Type]T, paths map[string]string) map[component.Type]string {
	out := map[component.Type]string{}
	for kind, factory := range factories {
		out[kind] = paths[factory.Type().String()]
	}
	return out
}

func components() (otelcol.Factories, error) {
	coreModule := func(path string) string { return core + path + " v" + version }
	contribModule := func(path string) string { return contrib + path + " v" + version }
	factories := otelcol.Factories{Telemetry: otelconftelemetry.NewFactory()}
	var err error
	if factories.Receivers, err = otelcol.MakeFactoryMap[receiver.Factory](
		otlpreceiver.NewFactory(),
		newNopReceiverFactory(),
	); err != nil {
		return otelcol.Factories{}, err
	}
	factories.ReceiverModules = modules(factories.Receivers, map[string]string{
		"otlp": coreModule("receiver/otlpreceiver"),
		"nop":  "gitfleet.test/otelcol-contrib (nop.go)",
	})
	if factories.Processors, err = otelcol.MakeFactoryMap[processor.Factory](
		batchprocessor.NewFactory(),
		memorylimiterprocessor.NewFactory(),
		resourceprocessor.NewFactory(),
	); err != nil {
		return otelcol.Factories{}, err
	}
	factories.ProcessorModules = modules(factories.Processors, map[string]string{
		"batch":          coreModule("processor/batchprocessor"),
		"memory_limiter": coreModule("processor/memorylimiterprocessor"),
		"resource":       contribModule("processor/resourceprocessor"),
	})
	if factories.Exporters, err = otelcol.MakeFactoryMap[exporter.Factory](
		otlphttpexporter.NewFactory(),
		otlpexporter.NewFactory(),
		debugexporter.NewFactory(),
		nopexporter.NewFactory(),
	); err != nil {
		return otelcol.Factories{}, err
	}
	factories.ExporterModules = modules(factories.Exporters, map[string]string{
		"otlp_http": coreModule("exporter/otlphttpexporter"),
		"otlp_grpc": coreModule("exporter/otlpexporter"),
		"debug":     coreModule("exporter/debugexporter"),
		"nop":       coreModule("exporter/nopexporter"),
	})
	if factories.Extensions, err = otelcol.MakeFactoryMap[extension.Factory](
		healthcheckextension.NewFactory(),
		opampextension.NewFactory(),
	); err != nil {
		return otelcol.Factories{}, err
	}
	factories.ExtensionModules = modules(factories.Extensions, map[string]string{
		"health_check": contribModule("extension/healthcheckextension"),
		"opamp":        contribModule("extension/opampextension"),
	})
	return factories, nil
}

func main() {
	settings := otelcol.CollectorSettings{
		BuildInfo: component.BuildInfo{
			Command:     "otelcol-contrib",
			Description: "OpenTelemetry Collector built from upstream modules for the gitfleet tests",
			Version:     version,
		},
		Factories: components,
		ConfigProviderSettings: otelcol.ConfigProviderSettings{
			ResolverSettings: confmap.ResolverSettings{
				ProviderFactories: []confmap.ProviderFactory{
					envprovider.NewFactory(),
					fileprovider.NewFactory(),
					yamlprovider.NewFactory(),
				},
			},
		},
	}
	if err := otelcol.NewCommand(settings).Execute(); err != nil {
		// cobra has printed the error already.
		os.Exit(1)
	}
}
