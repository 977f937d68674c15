//! The operator's assets in `deploy/observability/` ask only for series that
//! exist: every metric name in the Grafana dashboard's and the alert rules'
//! PromQL is one the worker's `/metrics` exports (a histogram as its
//! `_bucket`, `_sum` and `_count`), with label values it really has, or one
//! listed in `deploy/observability/external-metrics.txt` (RabbitMQ's
//! `rabbitmq_prometheus` plugin, Prometheus's `up`). A renamed metric or a
//! misspelt label value would otherwise leave a panel empty and an alert
//! silent, and nothing would say so.

use std::collections::{BTreeMap, BTreeSet};

use crate::common::{broker::get, *};
use promql_parser::{
    label::{MatchOp, Matcher},
    parser::{self, Expr},
    util::{ExprVisitor, walk_expr},
};
use serde_json::Value;

const DASHBOARD: &str = "deploy/observability/grafana-dashboard.json";
const ALERTS: &str = "deploy/observability/alerts.yaml";
const EXTERNAL: &str = "deploy/observability/external-metrics.txt";

/// Labels a scrape adds to every series: not the worker's to export.
const TARGET_LABELS: [&str; 2] = ["job", "instance"];

/// One vector or range selector of a query.
struct Selector {
    name: String,
    matchers: Vec<Matcher>,
    /// Where it was found, for the failure message.
    origin: String,
}

/// Gathers every selector of one expression.
struct Selectors<'a> {
    found: &'a mut Vec<Selector>,
    origin: &'a str,
}

impl ExprVisitor for Selectors<'_> {
    type Error = String;

    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, String> {
        let vs = match expr {
            Expr::VectorSelector(vs) => vs,
            Expr::MatrixSelector(ms) => &ms.vs,
            _ => return Ok(true),
        };
        if !vs.matchers.or_matchers.is_empty() {
            return Err(format!("{}: `or` inside a selector", self.origin));
        }
        let by_name = vs
            .matchers
            .matchers
            .iter()
            .find(|m| m.name == "__name__" && m.op == MatchOp::Equal);
        let name = vs
            .name
            .clone()
            .or_else(|| by_name.map(|m| m.value.clone()))
            .ok_or_else(|| format!("{}: a selector without a metric name", self.origin))?;
        self.found.push(Selector {
            name,
            matchers: vs
                .matchers
                .matchers
                .iter()
                .filter(|m| m.name != "__name__")
                .cloned()
                .collect(),
            origin: self.origin.to_owned(),
        });
        Ok(true)
    }
}

fn selectors_of(query: &str, origin: &str, found: &mut Vec<Selector>) {
    // Grafana's interval variables stand where PromQL wants a duration;
    // variables inside label values are strings to the parser.
    let promql = query
        .replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h");
    let expr = parser::parse(&promql).unwrap_or_else(|e| panic!("{origin}: {e}\n{query}"));
    let mut visitor = Selectors { found, origin };
    walk_expr(&mut visitor, &expr).unwrap_or_else(|e| panic!("{e}"));
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every `expr` of the dashboard's panels and the metric of every
/// `label_values(...)` variable query.
fn dashboard_selectors() -> Vec<Selector> {
    fn walk(v: &Value, title: &str, out: &mut Vec<Selector>) {
        match v {
            Value::Object(map) => {
                let title = (map.get("title").or_else(|| map.get("name")))
                    .and_then(Value::as_str)
                    .unwrap_or(title);
                if let Some(expr) = map.get("expr").and_then(Value::as_str) {
                    selectors_of(expr, &format!("dashboard panel {title:?}"), out);
                }
                // A variable's query is a string or {"query": string}: the
                // walk reaches the string either way.
                if let Some(inner) = map
                    .get("query")
                    .and_then(Value::as_str)
                    .and_then(|q| q.strip_prefix("label_values("))
                    .and_then(|q| q.rsplit_once(',').map(|(sel, _)| sel))
                {
                    selectors_of(inner, &format!("dashboard variable {title:?}"), out);
                }
                map.values().for_each(|v| walk(v, title, out));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, title, out)),
            _ => {}
        }
    }
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON");
    let mut out = Vec::new();
    walk(&dashboard, "", &mut out);
    out
}

fn alert_selectors() -> Vec<Selector> {
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&read(ALERTS)).expect("alerts.yaml is YAML");
    let mut out = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("alerting rules only");
            let expr = rule["expr"].as_str().expect("expr");
            selectors_of(expr, &format!("alert {name}"), &mut out);
        }
    }
    out
}

/// `name label…` lines of the external list: the labels each may be
/// selected by besides the scrape's own.
fn external_metrics() -> BTreeMap<String, BTreeSet<String>> {
    read(EXTERNAL)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let mut words = l.split_whitespace().map(str::to_owned);
            let name = words.next().expect("a name");
            (name, words.collect())
        })
        .collect()
}

/// The series of a Prometheus text exposition: name → label sets.
fn exposed_series(text: &str) -> BTreeMap<String, Vec<BTreeMap<String, String>>> {
    let mut series: BTreeMap<String, Vec<BTreeMap<String, String>>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (key, _value) = line.rsplit_once(' ').expect("`series value` lines");
        let (name, labels) = match key.split_once('{') {
            Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
            None => (key, BTreeMap::new()),
        };
        series.entry(name.to_owned()).or_default().push(labels);
    }
    series
}

/// `a="x",b="y"` (values may hold escaped quotes) into a map.
fn parse_labels(mut rest: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    while let Some((name, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => value.extend(chars.next().map(|(_, c)| c)),
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(name.trim_start_matches(',').to_owned(), value);
        rest = &after[end..];
    }
    labels
}

/// What is wrong with one selector, if anything.
fn problem(
    s: &Selector,
    worker: &BTreeMap<String, Vec<BTreeMap<String, String>>>,
    external: &BTreeMap<String, BTreeSet<String>>,
) -> Option<String> {
    // Matchers on the worker's own labels with a literal value (not a
    // dashboard variable) must all hold for one exported series.
    let own: Vec<&Matcher> = s
        .matchers
        .iter()
        .filter(|m| !TARGET_LABELS.contains(&m.name.as_str()) && !m.value.contains('$'))
        .collect();
    if let Some(label_sets) = worker.get(&s.name) {
        let empty = String::new();
        let matched = label_sets.iter().any(|labels| {
            own.iter()
                .all(|m| m.is_match(labels.get(&m.name).unwrap_or(&empty)))
        });
        return (!matched).then(|| {
            format!(
                "{}: no series of {} has {}",
                s.origin,
                s.name,
                own.iter()
                    .map(|m| m.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        });
    }
    let Some(allowed) = external.get(&s.name) else {
        return Some(format!(
            "{}: {} is neither in the worker's /metrics nor in {EXTERNAL}",
            s.origin, s.name
        ));
    };
    s.matchers
        .iter()
        .find(|m| !TARGET_LABELS.contains(&m.name.as_str()) && !allowed.contains(&m.name))
        .map(|m| {
            format!(
                "{}: {} has no label {} (see {EXTERNAL})",
                s.origin, s.name, m.name
            )
        })
}

#[tokio::test]
async fn dashboard_and_alerts_use_only_metrics_that_exist() {
    let dashboard = dashboard_selectors();
    let alerts = alert_selectors();
    // A parser that found nothing would pass every check below.
    assert!(
        dashboard.len() >= 35,
        "{} dashboard selectors",
        dashboard.len()
    );
    assert!(alerts.len() >= 19, "{} alert selectors", alerts.len());
    let external = external_metrics();

    let gewe = gewe_never_called().await;
    let app = spawn_app(test_settings(&gewe.uri())).await;
    let (status, text) = get(app.ops_addr, "/metrics").await;
    app.stop().await;
    assert_eq!(status, 200);
    let worker = exposed_series(&text);

    for name in external.keys() {
        assert!(
            !worker.contains_key(name),
            "{name} is the worker's own metric: take it out of {EXTERNAL}"
        );
    }
    let problems: Vec<String> = dashboard
        .iter()
        .chain(&alerts)
        .filter_map(|s| problem(s, &worker, &external))
        .collect();
    assert!(
        problems.is_empty(),
        "queries that select nothing:\n  {}\n\nthe worker exports: {}",
        problems.join("\n  "),
        worker.keys().cloned().collect::<Vec<_>>().join(", ")
    );

    // Each new series of the budgets and of trace export has a panel.
    let used: BTreeSet<&str> = dashboard.iter().map(|s| s.name.as_str()).collect();
    for name in [
        "commands_deferred_total",
        "account_cooldowns_total",
        "commands_expired_total",
        "telemetry_spans_dropped_total",
        "gewe_request_duration_seconds_bucket",
        "callbacks_accept_delay_seconds_bucket",
        "callback_requests_total",
        "rabbitmq_detailed_queue_messages",
    ] {
        assert!(used.contains(name), "the dashboard shows no {name}");
    }
}

#[test]
fn the_label_parser_reads_escaped_values() {
    let labels = parse_labels(r#"a="x",b="say \"hi\", then go",c="""#);
    assert_eq!(labels["a"], "x");
    assert_eq!(labels["b"], r#"say "hi", then go"#);
    assert_eq!(labels["c"], "");
}
