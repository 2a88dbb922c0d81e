//! Rate limits on a real server, over real HTTP and MQTT from one address
//! (127.0.0.1, like a fleet behind NAT): a flood of bad credentials gets
//! 429 with `Retry-After` (and CONNACK refusals on the broker), counted in
//! /metrics, while devices and operators with valid credentials from the
//! same address keep working; a runaway device meets its own budget
//! without touching the others.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fleet_server::config::MqttConfig;
use fleet_server::limits::LimitsConfig;
use fleet_sim::mqtt::Conn;
use integ::common::counter;
use integ::fleet::{ENROLL, OPERATOR, TestFleet, VIEWER};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn enroll(f: &TestFleet, id: &str) -> String {
    let r = f
        .req(Method::POST, "/api/v1/devices/enroll", None)
        .json(
            &json!({"enrollment_token": ENROLL, "device_id": id, "tags": {"board": "rpi4"},
                      "arch": "aarch64", "agent_version": "0.1.0"}),
        )
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "enroll {id}: {}", r.status());
    let v: Value = r.json().await.unwrap();
    v["credential"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_bad_credentials_get_429_while_honest_traffic_passes() {
    let f = TestFleet::start_with(|cfg, _| {
        cfg.limits = LimitsConfig {
            auth_failure_burst: 10,
            auth_failures_per_minute: 1,
            device_burst: 30,
            device_requests_per_sec: 1,
            ..LimitsConfig::default()
        };
        cfg.mqtt = Some(MqttConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..MqttConfig::default()
        });
    })
    .await;
    let cred = enroll(&f, "pi-1").await;
    let _other = enroll(&f, "pi-2").await;

    // Guessing tokens: 401s, then 429 with Retry-After.
    let t_flood = std::time::Instant::now();
    let mut statuses = Vec::new();
    for i in 0..40 {
        let r = f
            .req(Method::GET, "/api/v1/devices", Some(&format!("guess-{i}")))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        if status == 429 {
            let wait: u64 = r.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(wait >= 1, "Retry-After {wait}");
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"]["code"], "rate_limited", "{v}");
        }
        statuses.push(status);
    }
    assert_eq!(&statuses[..10], &[401; 10], "{statuses:?}");
    // One attempt a minute refills: on a slow machine a late guess may get
    // a 401 again, never more than the elapsed minutes allow.
    let refills = t_flood.elapsed().as_secs() / 60 + 1;
    let allowed = statuses[10..].iter().filter(|s| **s == 401).count() as u64;
    assert!(allowed <= refills, "{statuses:?}");
    assert!(
        statuses[10..].iter().all(|s| *s == 429 || *s == 401),
        "{statuses:?}"
    );
    // Bad enrollment tokens from the locked-out address: 429 as well.
    let r = f
        .req(Method::POST, "/api/v1/devices/enroll", None)
        .json(
            &json!({"enrollment_token": "wrong", "device_id": "x", "tags": {"board": "rpi4"},
                      "arch": "aarch64", "agent_version": "0.1.0"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);

    // The same address with valid credentials is not throttled: a device
    // checks in, an operator lists, a viewer reads metrics.
    let r = f
        .req(Method::GET, "/api/v1/device/desired", Some(&cred))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = f
        .req(Method::GET, "/api/v1/devices", Some(OPERATOR))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // The broker: bad logins are refused, then refused outright while
    // locked out; a device's valid login from the same address works.
    let mqtt = f.mqtt_url.clone().unwrap();
    let addr = mqtt.trim_start_matches("mqtt://").to_string();
    let err = Conn::connect(&addr, "pi-2", "pi-2", "not-the-credential", 30, None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ServiceUnavailable"), "{err}");
    let ok = Conn::connect(&addr, "pi-1", "pi-1", &cred, 30, None).await;
    assert!(ok.is_ok(), "a valid device login: {:?}", ok.err());
    let ok = Conn::connect(&addr, "grafana", "grafana", VIEWER, 30, None).await;
    assert!(ok.is_ok(), "a valid dashboard login: {:?}", ok.err());

    // A runaway device meets its own budget; another device does not.
    let mut limited = 0u64;
    let t_burst = std::time::Instant::now();
    for _ in 0..60 {
        let r = f
            .req(Method::GET, "/api/v1/device/desired", Some(&cred))
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            limited += 1;
        }
    }
    // Budget: the 30-request burst (one already spent above) plus one a
    // second while this ran.
    let refilled = t_burst.elapsed().as_secs() + 1;
    assert!(
        limited + 29 + refilled >= 60 && limited >= 1,
        "{limited} of 60 limited in {:?}",
        t_burst.elapsed()
    );
    let other = enroll(&f, "pi-3").await;
    let r = f
        .req(Method::GET, "/api/v1/device/desired", Some(&other))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // Counted in /metrics.
    let m = f.metrics(OPERATOR).await;
    // Every 429 above was counted: the flood's, the enrollment's (and the
    // broker refusal's).
    let refused_flood = statuses.iter().filter(|s| **s == 429).count() as u64;
    assert!(
        counter(&m, "fleet_rate_limited_total{limit=\"auth_failures\"}") > refused_flood,
        "{m}"
    );
    assert_eq!(
        counter(&m, "fleet_rate_limited_total{limit=\"device\"}"),
        limited,
        "{m}"
    );
    assert!(counter(&m, "fleet_auth_failures_total") >= 10, "{m}");
}
