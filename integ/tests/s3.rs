//! Bundle bytes in an S3-compatible bucket (`[bundles] url = "s3://…"`),
//! against a real `s3s-fs` server process started by the test: pushes
//! land in the bucket (one PUT, or a multipart upload past 8 MiB), a
//! refused push leaves nothing there, downloads keep Range and ETag
//! semantics through the server, devices install from it, and with
//! `presign_downloads` the bytes come from the bucket itself by a
//! redirect the agent follows without its credential.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use reqwest::StatusCode;
use reqwest::header;
use serde_json::json;

use integ::agent::InProcAgent as Agent;
use integ::bundles::{Model, Pack};
use integ::common::{counter, free_port};
use integ::fleet::{OPERATOR, ServerProc, TestFleet, config_file, trust_key};
use integ::s3::{S3, SECRET_KEY};

fn no_redirects() -> reqwest::Client {
    edge_agent::tls::install_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn download(
    http: &reqwest::Client,
    url: &str,
    headers: &[(header::HeaderName, String)],
) -> (StatusCode, header::HeaderMap, Vec<u8>) {
    let mut rb = http.get(url);
    for (k, v) in headers {
        rb = rb.header(k, v);
    }
    let r = rb.send().await.unwrap();
    let (status, h) = (r.status(), r.headers().clone());
    (status, h, r.bytes().await.unwrap().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bundles_in_a_bucket_keep_range_etag_and_reach_devices_directly_or_by_redirect() {
    let Some(mut s3) = S3::start("bundles_in_a_bucket_…", "fleet-bundles") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();

    // Wrong credentials: the server refuses to start, saying why.
    let bad = config_file(
        dir.path(),
        "bad.toml",
        &data,
        port,
        &s3.bundles_toml("bundles", false)
            .replace(SECRET_KEY, "not-the-secret"),
    );
    let mut p = ServerProc::spawn(&bad, port);
    assert!(!p.wait_exit(60).success());
    assert!(
        p.log().contains("bundle bucket s3://fleet-bundles/bundles"),
        "{}",
        p.log()
    );

    let o = ServerProc::run(&bad, &["--check-config"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("bundle bucket"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    let cfg = config_file(
        dir.path(),
        "a.toml",
        &data,
        port,
        &s3.bundles_toml("bundles", false),
    );
    let o = ServerProc::run(&cfg, &["--check-config"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("[bundles]: s3://fleet-bundles/bundles at http://127.0.0.1:"),
        "{out}"
    );
    let a = ServerProc::start(&cfg, port);
    let fleet = TestFleet::attach(port);

    // A 10 MiB bundle goes up as a multipart upload, a small one in one PUT.
    let big = Pack::new(Model::Rec, 1).bytes();
    assert!(big.len() > 8 << 20, "{} bytes", big.len());
    let big_id = fleet.push(big.clone()).await;
    let v1_bytes = Pack::new(Model::Cls, 1).bytes();
    let v1 = fleet.push(v1_bytes.clone()).await;
    let objects = s3.objects("bundles");
    let names: Vec<&str> = objects.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        {
            let mut v = vec![format!("{big_id}.bundle"), format!("{v1}.bundle")];
            v.sort();
            v
        },
        "{objects:?}"
    );
    let stored = |id: &str| {
        let (_, p) = objects
            .iter()
            .find(|(n, _)| n == &format!("{id}.bundle"))
            .unwrap();
        std::fs::read(p).unwrap()
    };
    assert!(stored(&big_id) == big, "the bucket holds the pushed bytes");
    assert!(stored(&v1) == v1_bytes);
    // Nothing stays behind locally: no bundle files, no staging files.
    let local: Vec<_> = std::fs::read_dir(data.join("bundles"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(local.is_empty(), "{local:?}");

    // A refused push leaves nothing in the bucket.
    let mut tampered = Pack::new(Model::Cls, 2).bytes();
    let mid = tampered.len() / 2;
    tampered[mid] ^= 0x40;
    let (status, body) = fleet.push_as(Some(OPERATOR), tampered).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(s3.objects("bundles").len(), 2);

    // Through the server: whole, a range, conditional requests.
    let http = no_redirects();
    let url = format!("{}/api/v1/bundles/{big_id}/download", fleet.url);
    let auth = (header::AUTHORIZATION, format!("Bearer {OPERATOR}"));
    let etag = format!("\"{big_id}\"");
    let (st, h, body) = download(&http, &url, std::slice::from_ref(&auth)).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(h[header::ETAG], etag.as_str());
    assert!(body == big, "the whole bundle");
    let (st, h, body) = download(
        &http,
        &url,
        &[
            auth.clone(),
            (header::RANGE, "bytes=9000000-9000999".into()),
        ],
    )
    .await;
    assert_eq!(st, StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        h[header::CONTENT_RANGE],
        format!("bytes 9000000-9000999/{}", big.len()).as_str()
    );
    assert!(body == big[9_000_000..9_001_000], "the range");
    let (st, _, body) = download(
        &http,
        &url,
        &[
            auth.clone(),
            (header::RANGE, format!("bytes={}-", big.len() - 10)),
            (header::IF_RANGE, etag.clone()),
        ],
    )
    .await;
    assert_eq!(st, StatusCode::PARTIAL_CONTENT);
    assert!(body == big[big.len() - 10..]);
    let (st, _, _) = download(
        &http,
        &url,
        &[auth.clone(), (header::IF_NONE_MATCH, etag.clone())],
    )
    .await;
    assert_eq!(st, StatusCode::NOT_MODIFIED);

    // A device installs v1 from the bucket, through the server.
    let adir = tempfile::tempdir().unwrap();
    let agent = Agent::start(Agent::config(
        &fleet.url,
        &adir.path().join("pi-1"),
        "pi-1",
        "rpi4",
        vec![trust_key(adir.path(), 1)],
    ))
    .await;
    let r1 = fleet.roll_out(&v1, "rpi4").await;
    fleet.wait_rollout(&r1, "completed", 120).await;

    // Restart with presigned downloads (and the bucket server restarted
    // too: nothing lives only in its memory).
    a.stop();
    s3.restart();
    let cfg_b = config_file(
        dir.path(),
        "b.toml",
        &data,
        port,
        &s3.bundles_toml("bundles", true),
    );
    let b = ServerProc::start(&cfg_b, port);
    let (st, h, _) = download(&http, &url, std::slice::from_ref(&auth)).await;
    assert_eq!(st, StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(h[header::ETAG], etag.as_str());
    let location = h[header::LOCATION].to_str().unwrap().to_string();
    assert!(location.starts_with(&s3.endpoint()), "{location}");
    assert!(location.contains("X-Amz-Signature="), "{location}");
    // The presigned URL alone (no bearer token) serves ranges.
    let (st, _, body) =
        download(&http, &location, &[(header::RANGE, "bytes=100-199".into())]).await;
    assert_eq!(st, StatusCode::PARTIAL_CONTENT);
    assert!(body == big[100..200]);
    // Tampering with the signed URL is refused by the bucket.
    let forged = location.replace(&big_id, &v1);
    let (st, _, _) = download(&http, &forged, &[]).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{forged}");
    // Without a credential the server redirects nobody.
    let (st, _, _) = download(&http, &url, &[]).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);

    // The device takes v2 through the redirect.
    let v2 = fleet.push(Pack::new(Model::Cls, 2).bytes()).await;
    let r2 = fleet.roll_out(&v2, "rpi4").await;
    fleet.wait_rollout(&r2, "completed", 120).await;
    agent
        .wait_for("v2 committed", 60, |s| {
            s["state"] == "committed" && s["record"]["active"]["version"] == "1.2.0"
        })
        .await;
    let metrics = fleet.metrics(OPERATOR).await;
    let redirected = counter(&metrics, "fleet_bundle_downloads_redirected_total");
    assert!(redirected >= 2, "{redirected}");
    let d = fleet.device("pi-1").await;
    assert_eq!(d["active"]["id"], json!(v2));
    agent.stop().await;
    b.stop();
}
