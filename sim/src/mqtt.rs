//! A small MQTT 3.1.1 client for simulated devices, on rumqttc's packet
//! codec: CONNECT with a Last Will, SUBSCRIBE, stop-and-wait QoS 1
//! publishing (as the agent's outbox does), PUBACKs for commands, pings.
//! One per simulated device: a few KB each, so 10,000 fit in one process.

use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, LastWill, Login, Packet, PubAck, Publish, Subscribe};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const MAX: usize = 256 * 1024;

/// A connected client.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    next_pkid: u16,
}

/// What came in while waiting.
#[derive(Debug)]
pub enum Incoming {
    /// A message on a subscribed topic (already acknowledged).
    Message(String, Vec<u8>),
    Other,
}

fn io(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::other(msg.into())
}

impl Conn {
    /// Connects and logs in; `Err` with the CONNACK code on refusal.
    pub async fn connect(
        addr: &str,
        client_id: &str,
        username: &str,
        password: &str,
        keep_alive: u16,
        will: Option<(String, Vec<u8>)>,
    ) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut c = Conn {
            stream,
            rbuf: BytesMut::with_capacity(256),
            wbuf: BytesMut::with_capacity(256),
            next_pkid: 0,
        };
        let mut connect = Connect::new(client_id);
        connect.keep_alive = keep_alive;
        connect.login = Some(Login::new(username, password));
        connect.last_will = will.map(|(t, m)| LastWill::new(t, m, QoS::AtLeastOnce, true));
        c.send(&Packet::Connect(connect)).await?;
        match c.read().await? {
            Packet::ConnAck(a) if a.code == rumqttc::mqttbytes::v4::ConnectReturnCode::Success => {
                Ok(c)
            }
            Packet::ConnAck(a) => Err(io(format!("connection refused: {:?}", a.code))),
            other => Err(io(format!("expected CONNACK, got {other:?}"))),
        }
    }

    async fn send(&mut self, p: &Packet) -> std::io::Result<()> {
        self.wbuf.clear();
        p.write(&mut self.wbuf, MAX)
            .map_err(|e| io(e.to_string()))?;
        self.stream.write_all(&self.wbuf).await
    }

    /// Reads one packet.
    pub async fn read(&mut self) -> std::io::Result<Packet> {
        loop {
            match Packet::read(&mut self.rbuf, MAX) {
                Ok(p) => return Ok(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(n)) => {
                    self.rbuf.reserve(n.max(128));
                    if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "closed by the broker",
                        ));
                    }
                }
                Err(e) => return Err(io(e.to_string())),
            }
        }
    }

    fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        self.next_pkid
    }

    /// Subscribes and waits for the SUBACK; `Ok(false)` if refused.
    pub async fn subscribe(&mut self, filter: &str) -> std::io::Result<bool> {
        let mut s = Subscribe::new(filter, QoS::AtLeastOnce);
        s.pkid = self.pkid();
        self.send(&Packet::Subscribe(s)).await?;
        loop {
            match self.read().await? {
                Packet::SubAck(a) => {
                    return Ok(a.return_codes.iter().all(|c| {
                        !matches!(c, rumqttc::mqttbytes::v4::SubscribeReasonCode::Failure)
                    }));
                }
                p => {
                    self.handle(p).await?;
                }
            }
        }
    }

    /// Publishes at QoS 1 and waits for its PUBACK (stop-and-wait);
    /// messages arriving meanwhile are acknowledged and returned.
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
        timeout: Duration,
    ) -> std::io::Result<Vec<Incoming>> {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, payload);
        p.retain = retain;
        p.pkid = self.pkid();
        let id = p.pkid;
        self.send(&Packet::Publish(p)).await?;
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let p = tokio::time::timeout_at(deadline, self.read())
                .await
                .map_err(|_| io("no PUBACK in time"))??;
            match p {
                Packet::PubAck(a) if a.pkid == id => return Ok(got),
                p => got.push(self.handle(p).await?),
            }
        }
    }

    /// Waits up to `wait` for an incoming packet.
    pub async fn poll(&mut self, wait: Duration) -> std::io::Result<Option<Incoming>> {
        match tokio::time::timeout(wait, self.read()).await {
            Ok(p) => Ok(Some(self.handle(p?).await?)),
            Err(_) => Ok(None),
        }
    }

    pub async fn ping(&mut self) -> std::io::Result<()> {
        self.send(&Packet::PingReq).await
    }

    pub async fn disconnect(mut self) -> std::io::Result<()> {
        self.send(&Packet::Disconnect).await
    }

    async fn handle(&mut self, p: Packet) -> std::io::Result<Incoming> {
        match p {
            Packet::Publish(m) => {
                if m.qos == QoS::AtLeastOnce {
                    self.send(&Packet::PubAck(PubAck::new(m.pkid))).await?;
                }
                Ok(Incoming::Message(m.topic, m.payload.to_vec()))
            }
            _ => Ok(Incoming::Other),
        }
    }
}
