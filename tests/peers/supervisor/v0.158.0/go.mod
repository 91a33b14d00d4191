// Builds the upstream OpAMP Supervisor at v0.158.0: its own module carries replace
// directives, so `go install …@v0.158.0` refuses it; required from here, it builds as released.
module gitfleet.test/opampsupervisor

go 1.25.0

require github.com/open-telemetry/opentelemetry-collector-contrib/cmd/opampsupervisor v0.158.0
