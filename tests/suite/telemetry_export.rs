//! OTLP/HTTP trace export (contract §9) against a real receiver that
//! decodes the protobuf (`common::otlp`): the spans of a command, their
//! parents and attributes, the event's `traceparent`, no token anywhere;
//! and a collector that fails or hangs neither delays commands nor goes
//! uncounted.

use std::time::{Duration, Instant};

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};
use wiremock::{
    Mock, MockServer, ResponseTemplate,
    matchers::{body_partial_json, method},
};

use crate::common::{
    TOKEN, WAIT, alone, command, done_or, eventually, gewe_ok, metric,
    otlp::{Answer, Collector, SpanSeen},
    spawn_app, test_settings, wait_for_metric,
};

const CLIENT: i32 = 3;
const PRODUCER: i32 = 4;
const CONSUMER: i32 = 5;
const ERROR: i32 = 2;

/// The publisher's span the command comes from.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PUBLISHER_SPAN: &str = "00f067aa0ba902b7";

fn traced(message_id: &str, traceparent: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(traceparent.into()),
    );
    BasicProperties::default()
        .with_message_id(message_id.into())
        .with_headers(headers)
}

fn event_traceparent(properties: &BasicProperties) -> Option<String> {
    match properties.headers().as_ref()?.inner().get("traceparent")? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

/// GeWe answering 503 once (its body echoing the token, as GeWe's errors
/// can), then success, for `app_id`.
async fn gewe_failing_once(app_id: &str) -> MockServer {
    let gewe = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_partial_json(serde_json::json!({ "appId": app_id })))
        .respond_with(
            ResponseTemplate::new(503)
                .set_body_string(format!(r#"{{"ret":500,"msg":"busy, token {TOKEN}"}}"#)),
        )
        .up_to_n_times(1)
        .expect(1)
        .mount(&gewe)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(gewe_ok("v3_traced")))
        .mount(&gewe)
        .await;
    gewe
}

#[tokio::test]
async fn a_command_retried_once_is_one_consumer_two_client_and_one_producer_span() {
    let collector = Collector::start(Answer::Accept).await;
    let gewe = gewe_failing_once("app-traced").await;
    let mut settings = test_settings(&gewe.uri());
    settings.telemetry.otlp_endpoint = Some(collector.endpoint());
    settings.telemetry.service_name = "friends-under-test".into();
    // Traces the worker starts are not recorded; the publisher's sampled
    // one is followed all the same.
    settings.telemetry.sample_ratio = 0.0;
    let mut app = spawn_app(settings).await;

    app.publish(&command("untraced-1", "app-plain")).await;
    let untraced = app.next_event().await;
    assert_eq!(untraced.status(), "succeeded");

    let incoming = format!("00-{TRACE_ID}-{PUBLISHER_SPAN}-01");
    app.publish_raw(
        command("traced-1", "app-traced").to_string().as_bytes(),
        traced("msg-traced-1", &incoming),
    )
    .await;
    let event = app.next_event().await;
    assert_eq!(event.status(), "succeeded");
    assert_eq!(event.attempts(), 2);

    // The consumer span ends last, once the delivery is settled.
    let spans: Vec<SpanSeen> = eventually(WAIT, || async {
        let spans: Vec<SpanSeen> = collector
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == TRACE_ID)
            .collect();
        done_or(spans.iter().any(|s| s.kind == CONSUMER), || {
            format!("spans of the trace so far: {spans:#?}")
        })
        .map(|()| spans)
    })
    .await;

    let consumers: Vec<&SpanSeen> = spans.iter().filter(|s| s.kind == CONSUMER).collect();
    assert_eq!(consumers.len(), 1, "{spans:#?}");
    let consumer = consumers[0];
    assert_eq!(
        consumer.parent_span_id, PUBLISHER_SPAN,
        "parented on traceparent"
    );
    assert_eq!(consumer.str("messaging.system"), Some("rabbitmq"));
    assert_eq!(
        consumer.str("messaging.destination.name"),
        Some(app.settings.amqp.command_queue.as_str())
    );
    assert_eq!(consumer.str("messaging.message.id"), Some("msg-traced-1"));
    assert_eq!(consumer.str("gewe.command_id"), Some("traced-1"));
    assert_eq!(consumer.str("gewe.app_id"), Some("app-traced"));
    assert_eq!(consumer.service.as_deref(), Some("friends-under-test"));
    assert_eq!(
        event_traceparent(&event.properties),
        Some(format!("00-{TRACE_ID}-{}-01", consumer.span_id)),
        "the event's traceparent names the consumer span"
    );

    let mut clients: Vec<&SpanSeen> = spans.iter().filter(|s| s.kind == CLIENT).collect();
    clients.sort_by_key(|s| s.int("gewe.attempt"));
    assert_eq!(clients.len(), 2, "{spans:#?}");
    for (client, (attempt, status, outcome)) in clients
        .iter()
        .zip([(1, 503, "upstream_unavailable"), (2, 200, "success")])
    {
        assert_eq!(client.parent_span_id, consumer.span_id);
        assert_eq!(client.int("gewe.attempt"), Some(attempt));
        assert_eq!(client.int("http.response.status_code"), Some(status));
        assert_eq!(client.str("http.request.method"), Some("POST"));
        assert_eq!(client.str("gewe.outcome"), Some(outcome));
    }
    assert_eq!(
        clients[0].status_code, ERROR,
        "the failed attempt is an error"
    );

    let producers: Vec<&SpanSeen> = spans.iter().filter(|s| s.kind == PRODUCER).collect();
    assert_eq!(producers.len(), 1, "{spans:#?}");
    assert_eq!(producers[0].parent_span_id, consumer.span_id);
    assert_eq!(
        producers[0].str("messaging.destination.name"),
        Some(app.settings.amqp.result_exchange.as_str())
    );
    assert_eq!(spans.len(), 4, "nothing else in the trace: {spans:#?}");

    // Sample ratio 0: the trace the worker started for the untraced
    // command was not exported (its spans ended before the traced ones).
    let all = collector.spans();
    assert!(
        all.iter()
            .all(|s| s.str("gewe.command_id") != Some("untraced-1")),
        "{all:#?}"
    );
    assert!(
        event_traceparent(&untraced.properties).is_some_and(|tp| tp.ends_with("-00")),
        "the untraced command's event names the worker's unsampled span"
    );
    for posted in collector.posted() {
        let raw = [
            posted.body.to_vec(),
            posted
                .headers
                .iter()
                .flat_map(|(n, v)| [n.as_bytes(), v].concat())
                .collect(),
        ]
        .concat();
        assert!(
            !raw.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()),
            "the token went to the collector"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn a_failing_or_hanging_collector_delays_no_command_and_its_spans_are_counted() {
    alone(async {
        let collector = Collector::start(Answer::Fail).await;
        let gewe = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_json(gewe_ok("v3_ok")))
            .mount(&gewe)
            .await;
        let mut settings = test_settings(&gewe.uri());
        settings.telemetry.otlp_endpoint = Some(collector.endpoint());
        let mut app = spawn_app(settings).await;
        let dropped = "telemetry_spans_dropped_total";
        let before = metric(app.ops_addr, dropped, "").await;

        // 500: each command's three spans (consumer, client, producer) are
        // posted, refused, dropped and counted.
        for i in 0..10 {
            app.publish(&command(&format!("refused-{i}"), "app-f"))
                .await;
        }
        assert!(
            app.events(10)
                .await
                .iter()
                .all(|e| e.status() == "succeeded")
        );
        wait_for_metric(
            app.ops_addr,
            dropped,
            "",
            before + 30.0,
            "spans refused by the collector are counted",
        )
        .await;

        // Hanging: once an export is stuck waiting for the collector,
        // commands still go through at full speed.
        collector.answer_with(Answer::Hang);
        let posted = collector.posted().len();
        app.publish(&command("hung-0", "app-f")).await;
        app.next_event().await;
        eventually(WAIT, || async {
            let now = collector.posted().len();
            done_or(now > posted, || {
                "no export reached the hanging collector".into()
            })
        })
        .await;
        let hung = metric(app.ops_addr, dropped, "").await;
        let started = Instant::now();
        for i in 1..=20 {
            app.publish(&command(&format!("hung-{i}"), "app-f")).await;
        }
        assert!(
            app.events(20)
                .await
                .iter()
                .all(|e| e.status() == "succeeded")
        );
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(5),
            "20 commands took {took:?} while the collector hung"
        );
        // The stuck export gives up after its timeout; its spans are counted.
        wait_for_metric(
            app.ops_addr,
            dropped,
            "",
            hung + 3.0,
            "spans of a timed-out export are counted",
        )
        .await;
        app.stop().await;
    })
    .await;
}
