//! A bundle far over axum's 2 MiB default (≥ 100 MiB) pushed with
//! `fleetctl bundle push` to a real `fleet-server` process: it is streamed
//! to disk while it is verified, so the server's peak RSS does not grow
//! with the bundle, and it downloads back byte for byte.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgefleet_wire::bundle::{Limits, Signed, read_signed, write_bundle};
use edgefleet_wire::keys::signing_key_from_seed;
use edgefleet_wire::manifest::Compression;
use integ::bundles::{Model, Pack};
use integ::common::{free_port, peak_rss, write_key};
use sha2::{Digest as _, Sha256};

const TOKEN: &str = "push-token";

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A validly signed bundle whose model is `mib` MiB of incompressible
/// bytes (the server verifies signatures and both digests; it never loads
/// the model).
fn big_bundle(mib: usize) -> Vec<u8> {
    let small = Pack::new(Model::MultiIo, 7).bytes();
    let mut m = read_signed(&mut &small[..], &Limits::default())
        .unwrap()
        .peek_unverified()
        .unwrap();
    let mut model = vec![0u8; mib << 20];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for chunk in model.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let compressed = zstd::bulk::compress(&model, 1).unwrap();
    m.payload.compression = Compression::Zstd;
    m.payload.len = model.len() as u64;
    m.payload.sha256 = Sha256::digest(&model).into();
    m.payload.compressed_len = compressed.len() as u64;
    m.payload.compressed_sha256 = Sha256::digest(&compressed).into();
    let signed = Signed::sign(&m, &[&signing_key_from_seed([1; 32])]).unwrap();
    let mut out = Vec::with_capacity(compressed.len() + 64 * 1024);
    write_bundle(&mut out, &signed, &compressed).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_bundle_is_pushed_streamed_and_downloads_back() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = big_bundle(100);
    assert!(bytes.len() >= 100 << 20, "{} bytes", bytes.len());
    let file = dir.path().join("big.bundle");
    std::fs::write(&file, &bytes).unwrap();
    let want = hex(&Sha256::digest(&bytes));
    drop(bytes);

    let port = free_port();
    let key = write_key(dir.path());
    let config = dir.path().join("fleet-server.toml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir = "{data}"
[http]
listen = "127.0.0.1:{port}"
[trust]
keys = ["{key}"]
[[auth.tokens]]
name = "ci"
role = "operator"
token = "{TOKEN}"
"#,
            data = dir.path().join("data").display(),
            key = key.display(),
        ),
    )
    .unwrap();
    let server = Server(
        Command::new(integ::bins::bin("fleet-server"))
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = peak_rss(server.0.id());

    let out = Command::new(integ::bins::bin("fleetctl"))
        .args([
            "bundle", "push", "--json", "--server", &url, "--token", TOKEN,
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "push failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rec["id"], want.as_str(), "{rec}");
    let after = peak_rss(server.0.id());
    eprintln!(
        "server peak RSS {} MiB before the push, {} MiB after",
        before >> 20,
        after >> 20
    );
    assert!(
        after < before + (32 << 20),
        "peak RSS grew by {} MiB for a 100 MiB push",
        (after - before) >> 20
    );

    // It downloads back whole.
    let client = edge_agent::tls::default_client();
    let mut r = client
        .get(format!("{url}/api/v1/bundles/{want}/download"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let mut h = Sha256::new();
    while let Some(chunk) = r.chunk().await.unwrap() {
        h.update(&chunk);
    }
    assert_eq!(hex(&h.finalize()), want);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
