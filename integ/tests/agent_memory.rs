//! Bounded memory on the agent under hostile request bodies, measured on a
//! real `edge-agent run` process serving the real cls model: a 60 MB JSON
//! body, a JSON body with far more elements than the model takes, and an
//! `.npz` zip bomb (a few dozen KiB inflating to 64 MiB) each get their
//! specific 4xx, the process's peak RSS stays within a few MiB of what it
//! was, and the model keeps serving correct outputs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::time::{Duration, Instant};

use integ::agent::AgentProc;
use integ::bundles::{Model, Pack};
use integ::common::{peak_rss, write_key};
use serde_json::Value;

/// An .npz whose one entry declares a 64 MiB f32 array of zeros,
/// deflated to a few dozen KiB.
fn zip_bomb() -> Vec<u8> {
    let mut cur = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut cur);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .large_file(true);
        z.start_file("x.npy", opts).unwrap();
        let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (4096, 4096), }";
        let mut header = dict.to_string();
        while !(10 + header.len() + 1).is_multiple_of(64) {
            header.push(' ');
        }
        header.push('\n');
        z.write_all(b"\x93NUMPY\x01\x00").unwrap();
        z.write_all(&(header.len() as u16).to_le_bytes()).unwrap();
        z.write_all(header.as_bytes()).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            z.write_all(&zeros).unwrap();
        }
        z.finish().unwrap();
    }
    cur.into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bodies_get_4xx_and_the_agent_memory_stays_flat() {
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path());
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"device_id = "mem-1"
data_dir = "{data}"
[trust]
keys = ["{key}"]
[http]
listen = "127.0.0.1:0"
[update]
watch_secs = 1
"#,
            data = dir.path().join("data").display(),
            key = key.display(),
        ),
    )
    .unwrap();
    let agent = AgentProc::spawn(&config, &dir.path().join("agent.log"));
    let http = edge_agent::tls::default_client();
    // Sideload the cls model and wait until it serves.
    agent
        .sideload(&http, Pack::new(Model::Cls, 1).bytes())
        .await;
    let serves_golden = || async { agent.cls_golden_diff(&http).await.is_ok_and(|d| d <= 1e-4) };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !serves_golden().await {
        assert!(
            Instant::now() < deadline,
            "the sideloaded model never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The install keeps the model compiled on a thread of its own: the
    // baseline includes that too.
    let deadline = Instant::now() + Duration::from_secs(60);
    while agent
        .counter("edge_agent_compiled_models_total{event=\"written\"}")
        .await
        == 0
    {
        assert!(
            Instant::now() < deadline,
            "the model was never kept compiled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A few honest requests first: the baseline includes serving.
    for _ in 0..5 {
        assert!(serves_golden().await);
    }
    let before = peak_rss(agent.child.id());

    let post = |ct: &'static str, body: Vec<u8>| {
        let req = http
            .post(format!("{}/v1/infer", agent.url))
            .header("content-type", ct)
            .body(body);
        async move {
            match req.send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let v: Value = r.json().await.unwrap_or(Value::Null);
                    (
                        status,
                        v["error"]["code"].as_str().unwrap_or("").to_string(),
                    )
                }
                // The agent may answer 413 and close before the whole body
                // is written; the client then sees a broken connection.
                Err(e) => (0, format!("connection: {e}")),
            }
        }
    };

    // 60 MB of JSON: refused by what the model takes, not buffered.
    let mut big =
        br#"{"inputs": {"x": {"dtype": "f32", "shape": [1, 3, 48, 192], "data": ["#.to_vec();
    while big.len() < 60_000_000 {
        big.extend_from_slice(b"0.123456789,");
    }
    big.extend_from_slice(b"0]}}}");
    let (status, code) = post("application/json", big).await;
    assert!(
        (status, code.as_str()) == (413, "body_too_large") || status == 0,
        "{status} {code}"
    );
    // Within the byte budget, far more elements than the model takes: the
    // decoder stops counting at the budget.
    let mut many = br#"{"inputs": {"x": {"dtype": "u8", "shape": [1], "data": ["#.to_vec();
    for _ in 0..600_000 {
        many.extend_from_slice(b"1,");
    }
    many.extend_from_slice(b"1]}}}");
    assert_eq!(
        post("application/json", many).await,
        (400, "element_count".to_string())
    );
    // The zip bomb: refused once it inflates past the model's input size.
    let bomb = zip_bomb();
    assert!(bomb.len() < 2 << 20, "{} bytes", bomb.len());
    assert_eq!(
        post("application/x-npz", bomb).await,
        (400, "malformed_npz".to_string())
    );

    let after = peak_rss(agent.child.id());
    eprintln!(
        "agent peak RSS {:.1} MiB before the hostile bodies, {:.1} MiB after",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0
    );
    assert!(
        after < before + (8 << 20),
        "peak RSS grew by {:.1} MiB",
        (after - before) as f64 / 1048576.0
    );
    assert!(serves_golden().await, "the model keeps serving");
}
