//! Private certificate authorities made for a test (rcgen): a CA, the
//! certificates it issues, and the PEM files of a fleet's TLS setup.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A fresh self-signed CA named `name`.
pub fn make_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

/// A certificate `ca` issues for `sans` (DNS names or IP addresses), PEM
/// (certificate, key).
pub fn issue(
    ca: &CertifiedIssuer<'_, KeyPair>,
    sans: &[&str],
    cn: &str,
    eku: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let mut p =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![eku];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A CA and the PEM files it issued, written into a folder.
#[derive(Debug)]
pub struct Pki {
    pub ca: PathBuf,
    /// For 127.0.0.1 and localhost.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// A client certificate naming no device.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Client certificates naming a device (subjectAltName DNS = its id):
    /// (id, certificate, key).
    pub devices: Vec<(String, PathBuf, PathBuf)>,
}

/// A fleet CA `name` with a server certificate and a client certificate,
/// as `dir/<name>-*.pem`.
pub fn pki(dir: &Path, name: &str) -> Pki {
    pki_for(dir, name, &[])
}

/// [`pki`], plus a client certificate for each of `devices`.
pub fn pki_for(dir: &Path, name: &str, devices: &[&str]) -> Pki {
    let ca = make_ca(&format!("{name} fleet CA"));
    let write = |file: &str, text: &str| {
        let p = dir.join(format!("{name}-{file}"));
        std::fs::write(&p, text).unwrap();
        p
    };
    let (server_pem, server_key) = issue(
        &ca,
        &["127.0.0.1", "localhost"],
        "fleet",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_pem, client_key) =
        issue(&ca, &[], "tls-device", ExtendedKeyUsagePurpose::ClientAuth);
    let devices = devices
        .iter()
        .map(|id| {
            let (pem, key) = issue(&ca, &[id], id, ExtendedKeyUsagePurpose::ClientAuth);
            (
                (*id).to_string(),
                write(&format!("{id}.pem"), &pem),
                write(&format!("{id}.key"), &key),
            )
        })
        .collect();
    Pki {
        devices,
        ca: write("ca.pem", &ca.pem()),
        server_cert: write("server.pem", &server_pem),
        server_key: write("server.key", &server_key),
        client_cert: write("client.pem", &client_pem),
        client_key: write("client.key", &client_key),
    }
}

/// An https client for `url` that trusts `ca` and presents `identity`
/// (certificate, key) if given: the agent's own TLS setup.
pub fn https_client(url: &str, ca: &Path, identity: Option<(&Path, &Path)>) -> reqwest::Client {
    edge_agent::tls::http_client(
        url,
        &edge_agent::tls::TlsFiles {
            ca_file: Some(ca.to_path_buf()),
            client_cert_file: identity.map(|i| i.0.to_path_buf()),
            client_key_file: identity.map(|i| i.1.to_path_buf()),
        },
        reqwest::Client::builder(),
    )
    .unwrap()
}

/// A request through `client` to `url` gets no successful answer: the
/// server's TLS handshake refused the client's certificate (or the
/// server refused the request).
pub async fn assert_refused_at_handshake(client: &reqwest::Client, url: &str) {
    let r = client.get(url).send().await;
    assert!(
        r.as_ref().map_or(true, |r| !r.status().is_success()),
        "another CA's certificate got through: {r:?}"
    );
}
