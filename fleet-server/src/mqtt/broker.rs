//! The embedded MQTT 3.1.1 broker: rumqttc's packet codec, and routing,
//! sessions and access control written for a device fleet.
//!
//! Why not a general broker library (docs/decisions.md, "The embedded
//! broker"): the server must acknowledge a device's message only once it
//! is in the store, and must decide every publish and subscribe by the
//! device's own identity. Here that is a direct call: a PUBLISH on a
//! device topic goes through [`Ingest::submit`], which resolves after the
//! store commit, and only then is the PUBACK written. A full ingest queue
//! therefore stops the broker from reading that device's socket —
//! backpressure to the device's outbox, never a drop of something
//! acknowledged.
//!
//! Routing is O(1) per message for the fleet's traffic: devices subscribe
//! to exact `cmd` topics (a hash map), and the few wildcard subscriptions
//! of dashboards are matched in a short list. A connect costs O(1) in
//! fleet size.
//!
//! Sessions are not persisted: every CONNACK says `session_present =
//! false` and clients subscribe again (devices do on every connect;
//! commands are notices, and devices poll anyway). A client id is owned
//! by one login; the same owner may take its session over (a reconnect
//! after a cut), anyone else is refused.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, PubComp, PubRec, Publish, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::acl::{self, Login};
use crate::auth::Tokens;
use crate::fleet::Fleet;
use crate::ingest::{Ingest, Refusal};

/// Largest packet a client may send (a telemetry record is ~1 KB).
pub const MAX_PACKET: usize = 256 * 1024;
/// A client must send CONNECT within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages queued for one subscriber before it counts as too slow.
const OUTBOX: usize = 256;

/// Counters for /metrics.
#[derive(Debug, Default)]
pub struct BrokerMetrics {
    pub connections: AtomicU64,
    pub connects: AtomicU64,
    pub refused_connection_limit: AtomicU64,
    pub refused: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    pub publishes_in: AtomicU64,
    pub publishes_denied: AtomicU64,
    pub subscribes_denied: AtomicU64,
    pub delivered: AtomicU64,
    pub dropped_slow_subscriber: AtomicU64,
    pub takeovers: AtomicU64,
    pub protocol_errors: AtomicU64,
}

impl BrokerMetrics {
    fn refuse(&self, reason: &'static str) {
        if let Ok(mut m) = self.refused.lock() {
            *m.entry(reason).or_default() += 1;
        }
    }
}

/// A message on its way to a subscriber.
#[derive(Clone, Debug)]
struct Outgoing {
    topic: Arc<str>,
    payload: Bytes,
    qos: QoS,
    retain: bool,
}

struct Session {
    owner: String,
    /// Distinguishes this connection from a later one with the same id.
    serial: u64,
    tx: mpsc::Sender<Outgoing>,
    kick: CancellationToken,
}

/// Subscriptions: exact topics by hash, wildcard filters in a list.
#[derive(Default)]
struct Routes {
    exact: HashMap<String, Vec<(String, QoS)>>,
    wild: Vec<(String, String, QoS)>,
}

impl Routes {
    fn add(&mut self, client: &str, filter: &str, qos: QoS) {
        self.remove(client, filter);
        if filter.contains(['+', '#']) {
            self.wild
                .push((filter.to_string(), client.to_string(), qos));
        } else {
            self.exact
                .entry(filter.to_string())
                .or_default()
                .push((client.to_string(), qos));
        }
    }

    fn remove(&mut self, client: &str, filter: &str) {
        if let Some(v) = self.exact.get_mut(filter) {
            v.retain(|(c, _)| c != client);
            if v.is_empty() {
                self.exact.remove(filter);
            }
        }
        self.wild.retain(|(f, c, _)| !(f == filter && c == client));
    }

    fn remove_client(&mut self, client: &str, filters: &[String]) {
        for f in filters {
            self.remove(client, f);
        }
    }

    /// (client, granted qos) of every subscription matching `topic`.
    fn matching(&self, topic: &str) -> Vec<(String, QoS)> {
        let mut out: Vec<(String, QoS)> = self.exact.get(topic).cloned().unwrap_or_default();
        for (f, c, q) in &self.wild {
            if topic_matches(f, topic) {
                out.push((c.clone(), *q));
            }
        }
        out
    }
}

/// MQTT 3.1.1 §4.7 topic matching: `+` one level, `#` the rest; wildcards
/// at the first level do not match topics starting with `$`.
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The shared broker state.
pub struct Broker {
    fleet: Arc<Fleet>,
    tokens: Tokens,
    ingest: Ingest,
    sessions: RwLock<HashMap<String, Session>>,
    routes: RwLock<Routes>,
    retained: RwLock<HashMap<String, Outgoing>>,
    serial: AtomicU64,
    max_connections: usize,
    limits: Arc<crate::limits::Limits>,
    pub metrics: BrokerMetrics,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

impl Broker {
    pub fn new(
        fleet: Arc<Fleet>,
        tokens: Tokens,
        ingest: Ingest,
        max_connections: usize,
        limits: Arc<crate::limits::Limits>,
    ) -> Arc<Broker> {
        Arc::new(Broker {
            fleet,
            tokens,
            ingest,
            sessions: RwLock::new(HashMap::new()),
            routes: RwLock::new(Routes::default()),
            retained: RwLock::new(HashMap::new()),
            serial: AtomicU64::new(1),
            max_connections,
            limits,
            metrics: BrokerMetrics::default(),
        })
    }

    /// Accepts connections until `shutdown`; connection tasks are tracked.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        shutdown: CancellationToken,
    ) -> crate::error::Result<()> {
        let tasks = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = shutdown.cancelled() => break,
            };
            let (stream, peer) = match accepted {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "broker accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if self.metrics.connections.load(Relaxed) as usize >= self.max_connections {
                self.metrics.refused_connection_limit.fetch_add(1, Relaxed);
                drop(stream);
                continue;
            }
            let _ = stream.set_nodelay(true);
            let b = self.clone();
            let stop = shutdown.clone();
            match tls.clone() {
                None => {
                    tasks.spawn(async move { b.connection(stream, peer.ip(), stop).await });
                }
                Some(acceptor) => {
                    tasks.spawn(async move {
                        // The handshake shares CONNECT's deadline.
                        match tokio::time::timeout(CONNECT_TIMEOUT, acceptor.accept(stream)).await {
                            Ok(Ok(tls)) => b.connection(tls, peer.ip(), stop).await,
                            Ok(Err(e)) => {
                                b.metrics.refuse("tls_handshake");
                                tracing::debug!(error = %e, %peer, "mqtt tls handshake failed");
                            }
                            Err(_) => b.metrics.refuse("tls_handshake"),
                        }
                    });
                }
            }
        }
        tasks.close();
        tasks.wait().await;
        Ok(())
    }

    /// Delivers a message from the server (a command to a device).
    pub fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) {
        self.route(&Outgoing {
            topic: Arc::from(topic),
            payload: Bytes::from(payload),
            qos: QoS::AtLeastOnce,
            retain,
        });
    }

    /// Closes the session of `client_id` (a revoked device).
    pub fn kick(&self, client_id: &str) {
        if let Some(s) = self
            .sessions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(client_id)
        {
            s.kick.cancel();
        }
    }

    /// Clients connected now.
    pub fn connected(&self) -> u64 {
        self.metrics.connections.load(Relaxed)
    }

    fn route(&self, m: &Outgoing) {
        if m.retain {
            let mut r = self.retained.write().unwrap_or_else(|e| e.into_inner());
            if m.payload.is_empty() {
                r.remove(&*m.topic);
            } else {
                r.insert(m.topic.to_string(), m.clone());
            }
        }
        let targets = self
            .routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .matching(&m.topic);
        if targets.is_empty() {
            return;
        }
        let sessions = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        for (client, qos) in targets {
            let Some(s) = sessions.get(&client) else {
                continue;
            };
            let out = Outgoing {
                qos: std::cmp::min_by_key(qos, m.qos, |q| *q as u8),
                // Retain is set only on messages sent because of a new
                // subscription (MQTT 3.1.1 §3.3.1.3).
                retain: false,
                ..m.clone()
            };
            match s.tx.try_send(out) {
                Ok(()) => {
                    self.metrics.delivered.fetch_add(1, Relaxed);
                }
                Err(_) => {
                    // A slow dashboard loses messages, never the server's
                    // ingest (which does not go through here).
                    self.metrics.dropped_slow_subscriber.fetch_add(1, Relaxed);
                }
            }
        }
    }

    async fn connection<S>(
        self: Arc<Self>,
        stream: S,
        peer: std::net::IpAddr,
        shutdown: CancellationToken,
    ) where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.metrics.connections.fetch_add(1, Relaxed);
        if let Err(e) = self.session(stream, peer, shutdown).await {
            tracing::debug!(error = %e, "mqtt connection ended");
        }
        self.metrics.connections.fetch_sub(1, Relaxed);
    }

    async fn session<S>(
        self: &Arc<Self>,
        mut stream: S,
        peer: std::net::IpAddr,
        shutdown: CancellationToken,
    ) -> std::io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut rbuf = BytesMut::with_capacity(512);
        let mut wbuf = BytesMut::with_capacity(256);
        // CONNECT first, within the timeout.
        let first = tokio::time::timeout(CONNECT_TIMEOUT, read_packet(&mut stream, &mut rbuf))
            .await
            .map_err(|_| io_err("no CONNECT in time"))??;
        let Packet::Connect(connect) = first else {
            self.metrics.protocol_errors.fetch_add(1, Relaxed);
            return Err(io_err("the first packet is not CONNECT"));
        };
        let login = acl::login(
            &self.fleet,
            &self.tokens,
            &connect.client_id,
            connect.login.as_ref().map(|l| l.username.as_str()),
            connect.login.as_ref().map(|l| l.password.as_bytes()),
        );
        let login = match login {
            Ok(l) => l,
            Err(r) => {
                // Failed logins count against the address; a locked-out
                // address is refused before its next guess is checked
                // (valid logins from it still pass: NAT-safe).
                let code = if self.limits.unauthenticated(peer).is_err() {
                    ConnectReturnCode::ServiceUnavailable
                } else {
                    self.limits.failed(peer);
                    match r {
                        acl::LoginRefusal::ClientId => ConnectReturnCode::BadClientId,
                        acl::LoginRefusal::BadCredentials => ConnectReturnCode::BadUserNamePassword,
                        acl::LoginRefusal::NotAllowed => ConnectReturnCode::NotAuthorized,
                    }
                };
                self.metrics.refuse(r.as_str());
                tracing::debug!(client = %connect.client_id, %peer, reason = r.as_str(), "mqtt login refused");
                write_packet(
                    &mut stream,
                    &mut wbuf,
                    &Packet::ConnAck(ConnAck::new(code, false)),
                )
                .await?;
                return Ok(());
            }
        };
        // The Last Will is a publish like any other: the same rules.
        if let Some(w) = &connect.last_will
            && !acl::may_publish(&login, &w.topic)
        {
            self.metrics.refuse("will_topic");
            write_packet(
                &mut stream,
                &mut wbuf,
                &Packet::ConnAck(ConnAck::new(ConnectReturnCode::NotAuthorized, false)),
            )
            .await?;
            return Ok(());
        }
        let client = connect.client_id.clone();
        let (tx, mut rx) = mpsc::channel::<Outgoing>(OUTBOX);
        let kick = CancellationToken::new();
        let serial = self.serial.fetch_add(1, Relaxed);
        let taken = {
            let mut sessions = self.sessions.write().unwrap_or_else(|e| e.into_inner());
            match sessions.get(&client) {
                Some(old) if old.owner != login.owner() => true,
                old => {
                    if let Some(old) = old {
                        // The same owner reconnecting: the old connection goes.
                        old.kick.cancel();
                        self.metrics.takeovers.fetch_add(1, Relaxed);
                    }
                    sessions.insert(
                        client.clone(),
                        Session {
                            owner: login.owner(),
                            serial,
                            tx,
                            kick: kick.clone(),
                        },
                    );
                    false
                }
            }
        };
        if taken {
            self.metrics.refuse("client_id_in_use");
            write_packet(
                &mut stream,
                &mut wbuf,
                &Packet::ConnAck(ConnAck::new(ConnectReturnCode::BadClientId, false)),
            )
            .await?;
            return Ok(());
        }
        self.metrics.connects.fetch_add(1, Relaxed);
        let mut filters: Vec<String> = Vec::new();
        let result = self
            .run(
                &mut stream,
                &mut rbuf,
                &mut wbuf,
                &client,
                &login,
                connect.keep_alive,
                &mut rx,
                &mut filters,
                &kick,
                &shutdown,
            )
            .await;
        // Clean up only our own registration (a takeover replaced it).
        {
            let mut sessions = self.sessions.write().unwrap_or_else(|e| e.into_inner());
            if sessions.get(&client).is_some_and(|s| s.serial == serial) {
                sessions.remove(&client);
            }
        }
        self.routes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove_client(&client, &filters);
        let clean = matches!(result, Ok(Ended::Disconnect));
        if !clean && let Some(w) = connect.last_will {
            let p = Publish {
                dup: false,
                qos: w.qos,
                retain: w.retain,
                topic: w.topic,
                pkid: 0,
                payload: w.message,
            };
            // Through the same path as a publish: stored, then routed.
            let _ = self.incoming(&p).await;
        }
        result.map(|_| ())
    }

    /// The device's or dashboard's publish: stored first if it is a device
    /// topic, then routed. `Err` when it must not be acknowledged.
    async fn incoming(&self, p: &Publish) -> Result<(), Refusal> {
        self.metrics.publishes_in.fetch_add(1, Relaxed);
        match self.ingest.submit(p.topic.clone(), p.payload.clone()).await {
            Ok(()) => {}
            // Stored nothing, but the message is bad: acknowledge (counted)
            // so a poison message cannot block the device's outbox.
            Err(Refusal::Store) => return Err(Refusal::Store),
            Err(_) => return Ok(()),
        }
        self.route(&Outgoing {
            topic: Arc::from(p.topic.as_str()),
            payload: p.payload.clone(),
            qos: p.qos,
            retain: p.retain,
        });
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn run<S>(
        &self,
        stream: &mut S,
        rbuf: &mut BytesMut,
        wbuf: &mut BytesMut,
        client: &str,
        login: &Login,
        keep_alive: u16,
        rx: &mut mpsc::Receiver<Outgoing>,
        filters: &mut Vec<String>,
        kick: &CancellationToken,
        shutdown: &CancellationToken,
    ) -> std::io::Result<Ended>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        write_packet(
            stream,
            wbuf,
            &Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)),
        )
        .await?;
        // §3.1.2.10: one and a half keep-alive periods without a packet.
        let idle = if keep_alive == 0 {
            Duration::from_secs(24 * 3600)
        } else {
            Duration::from_millis(u64::from(keep_alive) * 1500)
        };
        let mut next_pkid: u16 = 0;
        let mut qos2_seen: Vec<u16> = Vec::new();
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ok(Ended::Dropped),
                () = kick.cancelled() => return Ok(Ended::Dropped),
                out = rx.recv() => {
                    let Some(out) = out else { return Ok(Ended::Dropped) };
                    let pkid = if out.qos == QoS::AtMostOnce {
                        0
                    } else {
                        next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                        next_pkid
                    };
                    let p = Publish {
                        dup: false,
                        qos: out.qos,
                        retain: out.retain,
                        topic: out.topic.to_string(),
                        pkid,
                        payload: out.payload,
                    };
                    write_packet(stream, wbuf, &Packet::Publish(p)).await?;
                }
                packet = tokio::time::timeout(idle, read_packet(stream, rbuf)) => {
                    let packet = packet.map_err(|_| io_err("keep-alive expired"))??;
                    match packet {
                        Packet::Publish(p) => {
                            if !acl::may_publish(login, &p.topic) {
                                self.metrics.publishes_denied.fetch_add(1, Relaxed);
                                tracing::warn!(who = %login.owner(), topic = %p.topic, "mqtt publish denied");
                                // MQTT 3.1.1 has no negative ack: close.
                                return Err(io_err("publish not allowed"));
                            }
                            if p.qos == QoS::ExactlyOnce && qos2_seen.contains(&p.pkid) {
                                write_packet(stream, wbuf, &Packet::PubRec(PubRec::new(p.pkid))).await?;
                                continue;
                            }
                            if self.incoming(&p).await.is_err() {
                                // Not stored: no ack; the device sends it again.
                                return Err(io_err("the store did not take the message"));
                            }
                            match p.qos {
                                QoS::AtMostOnce => {}
                                QoS::AtLeastOnce => {
                                    write_packet(stream, wbuf, &Packet::PubAck(PubAck::new(p.pkid))).await?;
                                }
                                QoS::ExactlyOnce => {
                                    qos2_seen.push(p.pkid);
                                    write_packet(stream, wbuf, &Packet::PubRec(PubRec::new(p.pkid))).await?;
                                }
                            }
                        }
                        Packet::PubRel(r) => {
                            qos2_seen.retain(|id| *id != r.pkid);
                            write_packet(stream, wbuf, &Packet::PubComp(PubComp::new(r.pkid))).await?;
                        }
                        Packet::Subscribe(s) => {
                            let mut codes = Vec::with_capacity(s.filters.len());
                            let mut retained = Vec::new();
                            for f in &s.filters {
                                if !acl::may_subscribe(login, &f.path) {
                                    self.metrics.subscribes_denied.fetch_add(1, Relaxed);
                                    tracing::warn!(who = %login.owner(), filter = %f.path, "mqtt subscribe denied");
                                    codes.push(SubscribeReasonCode::Failure);
                                    continue;
                                }
                                let qos = std::cmp::min_by_key(f.qos, QoS::AtLeastOnce, |q| *q as u8);
                                self.routes
                                    .write()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .add(client, &f.path, qos);
                                if !filters.contains(&f.path) {
                                    filters.push(f.path.clone());
                                }
                                codes.push(SubscribeReasonCode::Success(qos));
                                retained.extend(
                                    self.retained
                                        .read()
                                        .unwrap_or_else(|e| e.into_inner())
                                        .values()
                                        .filter(|m| topic_matches(&f.path, &m.topic))
                                        .map(|m| Outgoing { qos: std::cmp::min_by_key(qos, m.qos, |q| *q as u8), ..m.clone() })
                                        .collect::<Vec<_>>(),
                                );
                            }
                            write_packet(stream, wbuf, &Packet::SubAck(SubAck::new(s.pkid, codes))).await?;
                            for m in retained {
                                let pkid = if m.qos == QoS::AtMostOnce {
                                    0
                                } else {
                                    next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                                    next_pkid
                                };
                                let p = Publish {
                                    dup: false,
                                    qos: m.qos,
                                    retain: true,
                                    topic: m.topic.to_string(),
                                    pkid,
                                    payload: m.payload,
                                };
                                write_packet(stream, wbuf, &Packet::Publish(p)).await?;
                            }
                        }
                        Packet::Unsubscribe(u) => {
                            {
                                let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
                                for f in &u.topics {
                                    routes.remove(client, f);
                                    filters.retain(|x| x != f);
                                }
                            }
                            write_packet(stream, wbuf, &Packet::UnsubAck(UnsubAck::new(u.pkid))).await?;
                        }
                        Packet::PingReq => write_packet(stream, wbuf, &Packet::PingResp).await?,
                        Packet::Disconnect => return Ok(Ended::Disconnect),
                        // Acks of what we sent: nothing is retransmitted.
                        Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) => {
                            if let Packet::PubRec(r) = packet {
                                let rel = rumqttc::mqttbytes::v4::PubRel::new(r.pkid);
                                write_packet(stream, wbuf, &Packet::PubRel(rel)).await?;
                            }
                        }
                        other => {
                            self.metrics.protocol_errors.fetch_add(1, Relaxed);
                            return Err(io_err(&format!("unexpected packet {:?}", packet_name(&other))));
                        }
                    }
                }
            }
        }
    }
}

/// How a connection ended.
enum Ended {
    /// DISCONNECT: no Last Will.
    Disconnect,
    /// Anything else: the Last Will goes out.
    Dropped,
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::SubAck(_) => "SUBACK",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingResp => "PINGRESP",
        _ => "other",
    }
}

fn io_err(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string())
}

/// Reads one packet, buffering as needed (bounded by [`MAX_PACKET`]).
async fn read_packet<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> std::io::Result<Packet> {
    loop {
        match Packet::read(buf, MAX_PACKET) {
            Ok(p) => {
                // Idle connections should not keep a grown buffer.
                if buf.is_empty() && buf.capacity() > 16 * 1024 {
                    *buf = BytesMut::with_capacity(512);
                }
                return Ok(p);
            }
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(n)) => {
                buf.reserve(n.max(256));
                if stream.read_buf(buf).await? == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "connection closed",
                    ));
                }
            }
            Err(e) => return Err(io_err(&e.to_string())),
        }
    }
}

async fn write_packet<S: AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    p: &Packet,
) -> std::io::Result<()> {
    buf.clear();
    p.write(buf, MAX_PACKET + 1024)
        .map_err(|e| io_err(&e.to_string()))?;
    stream.write_all(buf).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_matching_follows_mqtt_3_1_1() {
        for (f, t, ok) in [
            ("edgefleet/v1/#", "edgefleet/v1/a/state", true),
            ("edgefleet/v1/+/state", "edgefleet/v1/a/state", true),
            ("edgefleet/v1/+/state", "edgefleet/v1/a/b/state", false),
            ("edgefleet/v1/a/cmd", "edgefleet/v1/a/cmd", true),
            ("edgefleet/v1/a/cmd", "edgefleet/v1/b/cmd", false),
            ("edgefleet/#", "edgefleet", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("a/+", "a/", true),
            ("a/+", "a", false),
        ] {
            assert_eq!(topic_matches(f, t), ok, "{f} vs {t}");
        }
    }

    #[test]
    fn routes_find_exact_and_wildcard_subscribers() {
        let mut r = Routes::default();
        r.add("pi-a", "edgefleet/v1/pi-a/cmd", QoS::AtLeastOnce);
        r.add("dash", "edgefleet/v1/#", QoS::AtMostOnce);
        let m = r.matching("edgefleet/v1/pi-a/cmd");
        assert_eq!(m.len(), 2);
        assert_eq!(r.matching("edgefleet/v1/pi-b/cmd").len(), 1);
        r.remove_client("dash", &["edgefleet/v1/#".into()]);
        assert_eq!(r.matching("edgefleet/v1/pi-b/cmd").len(), 0);
        r.add("pi-a", "edgefleet/v1/pi-a/cmd", QoS::AtLeastOnce);
        assert_eq!(
            r.matching("edgefleet/v1/pi-a/cmd").len(),
            1,
            "no duplicates"
        );
    }
}
