//! Collector-config lint, shared by `gitfleet check` and the server.
//!
//! It checks the structure the collector itself would reject (YAML errors, undefined
//! components, empty pipelines) and a few ordering mistakes that cost people outages
//! (`memory_limiter` not first, `batch` ahead of a sampler). It knows component *kinds*,
//! not the settings of each component type: those depend on the collector build.

use std::collections::{BTreeMap, BTreeSet};

use crate::problem::{Problem, line_of_offset};
use crate::repo::yaml::{self, Node};

const SECTIONS: [&str; 6] = ["receivers", "processors", "exporters", "connectors", "extensions", "service"];
const SAMPLERS: [&str; 2] = ["tail_sampling", "probabilistic_sampler"];
const SIGNALS: [&str; 4] = ["traces", "metrics", "logs", "profiles"];

/// How many pipelines a collector configuration declares under `service.pipelines`; `None`
/// for text that is not a YAML mapping (a JSON agent config, garbage). An agent's
/// effective configuration with none, while its assigned one has some, is a collector
/// running something else than it reported applied.
pub fn pipeline_count(text: &str) -> Option<usize> {
    let root = yaml::parse(text).ok().flatten()?;
    root.as_mapping()?;
    let pipelines = root.get("service").and_then(|service| service.get("pipelines"));
    Some(pipelines.and_then(Node::as_mapping).map_or(0, <[(Node, Node)]>::len))
}

/// Lints one configuration file. JSON files (for non-collector agents) only get a parse check.
pub fn lint(path: &str, body: &[u8]) -> Vec<Problem> {
    let text = match std::str::from_utf8(body) {
        Ok(text) => text,
        Err(error) => {
            let valid = std::str::from_utf8(&body[..error.valid_up_to()]).expect("prefix up to valid_up_to is UTF-8");
            let line = line_of_offset(valid, valid.len());
            return vec![Problem::error(path, Some(line), "file is not valid UTF-8")];
        }
    };
    if path.ends_with(".json") {
        return match serde_json::from_str::<serde_json::Value>(text) {
            Ok(_) => Vec::new(),
            Err(error) => {
                vec![Problem::error(path, u32::try_from(error.line()).ok(), format!("invalid JSON: {error}"))]
            }
        };
    }
    let root = match yaml::parse(text) {
        Ok(Some(root)) => root,
        Ok(None) => return vec![Problem::error(path, None, "configuration is empty")],
        Err(error) => {
            return vec![Problem::error(path, Some(error.line), format!("invalid YAML: {}", error.message))];
        }
    };
    let mut lint = Lint { path, problems: Vec::new() };
    lint.collector_config(&root);
    lint.problems.sort_by_key(|problem| problem.line);
    lint.problems
}

struct Lint<'a> {
    path: &'a str,
    problems: Vec<Problem>,
}

/// A component declared under one of the sections, e.g. `otlp/internal` under `receivers`.
struct Declared<'n> {
    line: u32,
    used: bool,
    _node: &'n Node,
}

impl Lint<'_> {
    fn error(&mut self, line: u32, message: String) {
        self.problems.push(Problem::error(self.path, Some(line), message));
    }

    fn warning(&mut self, line: u32, message: String) {
        self.problems.push(Problem::warning(self.path, Some(line), message));
    }

    fn collector_config(&mut self, root: &Node) {
        let Some(top) = root.as_mapping() else {
            self.error(root.line, format!("a collector configuration is a mapping, found {}", root.kind()));
            return;
        };
        for (key, _) in top {
            match key.as_str() {
                Some(name) if SECTIONS.contains(&name) => {}
                Some(name) => self.error(
                    key.line,
                    format!("unknown top-level section `{name}`; the collector accepts {}", SECTIONS.join(", ")),
                ),
                None => self.error(key.line, "top-level keys must be section names".to_owned()),
            }
        }
        let mut receivers = self.declared(root, "receivers");
        let mut processors = self.declared(root, "processors");
        let mut exporters = self.declared(root, "exporters");
        let mut connectors = self.declared(root, "connectors");
        let mut extensions = self.declared(root, "extensions");

        let Some(service) = root.get("service").filter(|s| !s.is_null()) else {
            self.error(root.line, "no `service` section: the collector would run no pipeline".to_owned());
            return;
        };
        if service.as_mapping().is_none() {
            self.error(service.line, format!("`service` must be a mapping, found {}", service.kind()));
            return;
        }

        if let Some(list) = service.get("extensions").filter(|n| !n.is_null()) {
            for item in self.id_list(list, "service.extensions") {
                match extensions.get_mut(item.0.as_str()) {
                    Some(declared) => declared.used = true,
                    None => self.error(
                        item.1,
                        format!(
                            "extension `{}` is enabled in service.extensions but not defined under `extensions`",
                            item.0
                        ),
                    ),
                }
            }
        }

        // Connectors used as exporter / receiver, to check both ends are wired.
        let mut connector_as_exporter: BTreeMap<String, u32> = BTreeMap::new();
        let mut connector_as_receiver: BTreeMap<String, u32> = BTreeMap::new();

        match service.get("pipelines").filter(|n| !n.is_null()) {
            None => {
                self.error(service.line, "service.pipelines is missing: the collector would run nothing".to_owned())
            }
            Some(pipelines) => match pipelines.as_mapping() {
                None => self
                    .error(pipelines.line, format!("service.pipelines must be a mapping, found {}", pipelines.kind())),
                Some([]) => {
                    self.error(pipelines.line, "service.pipelines is empty: the collector would run nothing".to_owned())
                }
                Some(pairs) => {
                    for (name_node, pipeline) in pairs {
                        let name = name_node.as_str().unwrap_or_default().to_owned();
                        let signal = name.split('/').next().unwrap_or_default();
                        if !SIGNALS.contains(&signal) {
                            self.error(
                                name_node.line,
                                format!(
                                    "pipeline `{name}`: unknown signal `{signal}` (expected {})",
                                    SIGNALS.join(", ")
                                ),
                            );
                        }
                        if pipeline.as_mapping().is_none() && !pipeline.is_null() {
                            self.error(
                                pipeline.line,
                                format!("pipeline `{name}` must be a mapping, found {}", pipeline.kind()),
                            );
                            continue;
                        }
                        let receiver_ids = self.pipeline_list(pipeline, &name, "receivers");
                        let processor_ids = self.pipeline_list(pipeline, &name, "processors");
                        let exporter_ids = self.pipeline_list(pipeline, &name, "exporters");
                        if receiver_ids.is_empty() {
                            self.error(name_node.line, format!("pipeline `{name}` has no receivers"));
                        }
                        if exporter_ids.is_empty() {
                            self.error(name_node.line, format!("pipeline `{name}` has no exporters"));
                        }
                        for (id, line) in &receiver_ids {
                            if let Some(declared) = receivers.get_mut(id.as_str()) {
                                declared.used = true;
                            } else if let Some(declared) = connectors.get_mut(id.as_str()) {
                                declared.used = true;
                                connector_as_receiver.entry(id.clone()).or_insert(*line);
                            } else {
                                self.error(*line, format!("receiver `{id}` is used in pipeline `{name}` but not defined under `receivers` or `connectors`"));
                            }
                        }
                        for (id, line) in &processor_ids {
                            match processors.get_mut(id.as_str()) {
                                Some(declared) => declared.used = true,
                                None => self.error(*line, format!("processor `{id}` is used in pipeline `{name}` but not defined under `processors`")),
                            }
                        }
                        for (id, line) in &exporter_ids {
                            if let Some(declared) = exporters.get_mut(id.as_str()) {
                                declared.used = true;
                            } else if let Some(declared) = connectors.get_mut(id.as_str()) {
                                declared.used = true;
                                connector_as_exporter.entry(id.clone()).or_insert(*line);
                            } else {
                                self.error(*line, format!("exporter `{id}` is used in pipeline `{name}` but not defined under `exporters` or `connectors`"));
                            }
                        }
                        self.processor_order(&name, &processor_ids);
                    }
                }
            },
        }

        for (id, line) in &connector_as_exporter {
            if !connector_as_receiver.contains_key(id) {
                self.error(
                    *line,
                    format!("connector `{id}` is used as an exporter but no pipeline uses it as a receiver"),
                );
            }
        }
        for (id, line) in &connector_as_receiver {
            if !connector_as_exporter.contains_key(id) {
                self.error(
                    *line,
                    format!("connector `{id}` is used as a receiver but no pipeline uses it as an exporter"),
                );
            }
        }

        for (kind, declared) in
            [("receiver", &receivers), ("processor", &processors), ("exporter", &exporters), ("connector", &connectors)]
        {
            for (id, component) in declared.iter().filter(|(_, c)| !c.used) {
                self.warning(component.line, format!("{kind} `{id}` is defined but not used in any pipeline"));
            }
        }
        for (id, component) in extensions.iter().filter(|(_, c)| !c.used) {
            self.warning(component.line, format!("extension `{id}` is defined but not enabled in service.extensions"));
        }
    }

    /// The components declared under a top-level section, by id.
    fn declared<'n>(&mut self, root: &'n Node, section: &str) -> BTreeMap<String, Declared<'n>> {
        let mut declared = BTreeMap::new();
        let Some(node) = root.get(section).filter(|n| !n.is_null()) else {
            return declared;
        };
        let Some(pairs) = node.as_mapping() else {
            self.error(node.line, format!("`{section}` must be a mapping of components, found {}", node.kind()));
            return declared;
        };
        for (key, value) in pairs {
            match key.as_str() {
                Some(id) if valid_component_id(id) => {
                    if declared.insert(id.to_owned(), Declared { line: key.line, used: false, _node: value }).is_some()
                    {
                        self.error(key.line, format!("`{section}.{id}` is defined twice"));
                    }
                }
                Some(id) => {
                    self.error(key.line, format!("`{id}` under `{section}` is not a component id (type or type/name)"))
                }
                None => self.error(key.line, format!("keys under `{section}` must be component ids")),
            }
        }
        declared
    }

    /// A pipeline's `receivers`, `processors` or `exporters`, as (id, line).
    fn pipeline_list(&mut self, pipeline: &Node, name: &str, field: &str) -> Vec<(String, u32)> {
        match pipeline.get(field).filter(|n| !n.is_null()) {
            None => Vec::new(),
            Some(list) => self.id_list(list, &format!("pipeline `{name}` {field}")),
        }
    }

    fn id_list(&mut self, list: &Node, what: &str) -> Vec<(String, u32)> {
        let Some(items) = list.as_sequence() else {
            self.error(list.line, format!("{what} must be a list, found {}", list.kind()));
            return Vec::new();
        };
        let mut seen = BTreeSet::new();
        let mut ids = Vec::new();
        for item in items {
            match item.as_str() {
                Some(id) if !item.is_null() => {
                    if !seen.insert(id.to_owned()) {
                        self.error(item.line, format!("{what} lists `{id}` twice"));
                        continue;
                    }
                    ids.push((id.to_owned(), item.line));
                }
                _ => self.error(item.line, format!("{what} must list component ids, found {}", item.kind())),
            }
        }
        ids
    }

    fn processor_order(&mut self, pipeline: &str, processors: &[(String, u32)]) {
        let kind = |id: &str| id.split('/').next().unwrap_or_default().to_owned();
        if let Some(position) = processors.iter().position(|(id, _)| kind(id) == "memory_limiter")
            && position > 0
        {
            let (id, line) = &processors[position];
            self.warning(*line, format!("`{id}` should be the first processor in pipeline `{pipeline}` so it can refuse data before other processors use memory"));
        }
        let first_batch = processors.iter().position(|(id, _)| kind(id) == "batch");
        let last_sampler = processors.iter().rposition(|(id, _)| SAMPLERS.contains(&kind(id).as_str()));
        if let (Some(batch), Some(sampler)) = (first_batch, last_sampler)
            && batch < sampler
        {
            let (batch_id, line) = &processors[batch];
            let sampler_id = &processors[sampler].0;
            self.warning(*line, format!("`{batch_id}` comes before `{sampler_id}` in pipeline `{pipeline}`: sample first, then batch, or sampling sees mixed batches"));
        }
    }
}

fn valid_component_id(id: &str) -> bool {
    let kind = id.split('/').next().unwrap_or_default();
    let mut chars = kind.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !id.ends_with('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(text: &str) -> Vec<String> {
        lint("configs/x.yaml", text.as_bytes()).iter().map(ToString::to_string).collect()
    }

    const GOOD: &str = "\
receivers:
  otlp:
    protocols:
      grpc: {}
processors:
  memory_limiter:
    check_interval: 1s
    limit_percentage: 80
  batch: {}
exporters:
  otlphttp:
    endpoint: https://backend.example.com
extensions:
  health_check: {}
service:
  extensions: [health_check]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [memory_limiter, batch]
      exporters: [otlphttp]
";

    #[test]
    fn a_good_config_has_no_problems() {
        assert_eq!(messages(GOOD), Vec::<String>::new());
    }

    #[test]
    fn undefined_and_unused_components() {
        let text = "\
receivers:
  otlp: {}
  hostmetrics: {}
exporters:
  debug: {}
extensions:
  pprof: {}
service:
  extensions: [health_check]
  pipelines:
    metrics:
      receivers: [otlp, prometheus]
      processors: [batch]
      exporters: [debug]
";
        assert_eq!(
            messages(text),
            vec![
                "configs/x.yaml:3: warning: receiver `hostmetrics` is defined but not used in any pipeline",
                "configs/x.yaml:7: warning: extension `pprof` is defined but not enabled in service.extensions",
                "configs/x.yaml:9: error: extension `health_check` is enabled in service.extensions but not defined under `extensions`",
                "configs/x.yaml:12: error: receiver `prometheus` is used in pipeline `metrics` but not defined under `receivers` or `connectors`",
                "configs/x.yaml:13: error: processor `batch` is used in pipeline `metrics` but not defined under `processors`",
            ]
        );
    }

    #[test]
    fn pipelines_are_counted_in_yaml_only() {
        assert_eq!(pipeline_count("service:\n  pipelines:\n    traces: {}\n    logs/x: {}\n"), Some(2));
        assert_eq!(pipeline_count("extensions:\n  opamp: {}\nservice:\n  extensions: [opamp]\n"), Some(0));
        assert_eq!(pipeline_count("connectors: {}\n"), Some(0));
        assert_eq!(pipeline_count("- a list\n"), None);
        assert_eq!(pipeline_count("a: [unclosed\n"), None);
        assert_eq!(pipeline_count(""), None);
    }

    #[test]
    fn pipelines_need_receivers_and_exporters() {
        let text = "\
receivers:
  otlp: {}
exporters:
  debug: {}
service:
  pipelines:
    logs:
      receivers: [otlp]
    traces:
      exporters: [debug]
";
        assert_eq!(
            messages(text),
            vec![
                "configs/x.yaml:7: error: pipeline `logs` has no exporters",
                "configs/x.yaml:9: error: pipeline `traces` has no receivers",
            ]
        );
    }

    #[test]
    fn processor_order_warnings() {
        let text = "\
receivers:
  otlp: {}
processors:
  batch: {}
  tail_sampling: {}
  memory_limiter: {}
exporters:
  debug: {}
service:
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch, tail_sampling, memory_limiter]
      exporters: [debug]
";
        assert_eq!(
            messages(text),
            vec![
                "configs/x.yaml:13: warning: `memory_limiter` should be the first processor in pipeline `traces` so it can refuse data before other processors use memory",
                "configs/x.yaml:13: warning: `batch` comes before `tail_sampling` in pipeline `traces`: sample first, then batch, or sampling sees mixed batches",
            ]
        );
    }

    #[test]
    fn connectors_must_be_wired_at_both_ends() {
        let text = "\
receivers:
  otlp: {}
connectors:
  spanmetrics: {}
  count: {}
exporters:
  debug: {}
service:
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [spanmetrics, count]
    metrics:
      receivers: [spanmetrics]
      exporters: [debug]
";
        assert_eq!(
            messages(text),
            vec![
                "configs/x.yaml:12: error: connector `count` is used as an exporter but no pipeline uses it as a receiver"
            ]
        );
    }

    #[test]
    fn structural_errors() {
        assert_eq!(messages(""), vec!["configs/x.yaml: error: configuration is empty"]);
        assert_eq!(
            messages("- a\n- b\n"),
            vec!["configs/x.yaml:1: error: a collector configuration is a mapping, found a list"]
        );
        assert_eq!(
            messages("recievers: {}\nservice:\n  pipelines: {}\n"),
            vec![
                "configs/x.yaml:1: error: unknown top-level section `recievers`; the collector accepts receivers, processors, exporters, connectors, extensions, service",
                "configs/x.yaml:3: error: service.pipelines is empty: the collector would run nothing",
            ]
        );
        assert_eq!(
            messages("receivers: {}\n"),
            vec!["configs/x.yaml:1: error: no `service` section: the collector would run no pipeline"]
        );
        let yaml_error = messages("service:\n  pipelines: [\n");
        assert_eq!(yaml_error.len(), 1);
        assert!(yaml_error[0].contains("error: invalid YAML"), "{yaml_error:?}");
    }

    #[test]
    fn bytes_that_are_not_utf8_and_bad_json() {
        assert_eq!(
            lint("configs/x.yaml", b"receivers:\n  \xff: {}\n").iter().map(ToString::to_string).collect::<Vec<_>>(),
            vec!["configs/x.yaml:2: error: file is not valid UTF-8"]
        );
        assert_eq!(lint("configs/sdk.json", br#"{"sampler": "always_on"}"#), vec![]);
        let bad = lint("configs/sdk.json", b"{\n  \"a\": \n}");
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].line, Some(3));
    }
}
