//! One session as the client app runs it: assign, send the config through `json_transport`,
//! connect, end.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use url::Url;
use whist_types::MandelboxId;

/// Who the caller is: a token where the deployment checks them, a plain user id where it runs
/// without token checks (the local fleet).
#[derive(Debug, Clone)]
pub enum Identity {
    Token(String),
    User(String),
}

/// Where and as whom sessions are asked for.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// The scaling-service's base URL.
    pub scaling_url: Url,
    pub identity: Identity,
    /// Regions in order of preference.
    pub regions: Vec<String>,
    /// The client build's commit; the fleet only assigns hosts pinned to it (`local_dev`
    /// matches any host of a local deployment).
    pub client_commit: String,
    /// The configuration sent to the mandelbox (`json_data`).
    pub config: serde_json::Value,
    /// How long one HTTP request may take.
    pub timeout: Duration,
}

/// An assigned mandelbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub ip: IpAddr,
    pub mandelbox_id: MandelboxId,
}

/// The `json_transport` reply: where the session listens and its key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SessionPorts {
    pub port_32261: u16,
    pub port_32262: u16,
    pub port_32263: u16,
    pub port_32273: u16,
    pub aes_key: String,
}

/// A session that is ready for its client.
#[derive(Debug, Clone)]
pub struct ReadySession {
    pub assignment: Assignment,
    pub ports: SessionPorts,
    /// From sending the assign request to the assignment.
    pub assign_time: Duration,
    /// From sending `json_transport` to its reply with the ports.
    pub transport_time: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The fleet refused the assign with one of its codes (`NO_INSTANCE_AVAILABLE`, …).
    #[error("assign refused: {0}")]
    Refused(String),
    #[error("{step} answered {status}: {body}")]
    Status {
        step: &'static str,
        status: reqwest::StatusCode,
        body: String,
    },
    #[error("{step}: {source}")]
    Http {
        step: &'static str,
        source: reqwest::Error,
    },
    #[error("{0}")]
    Session(String),
}

/// Talks to one deployment's scaling-service.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    options: SessionOptions,
}

impl Client {
    pub fn new(options: SessionOptions) -> Result<Self, SessionError> {
        let http = reqwest::Client::builder()
            .timeout(options.timeout)
            .build()
            .map_err(|source| SessionError::Http {
                step: "build the HTTP client",
                source,
            })?;
        Ok(Self { http, options })
    }

    /// Assigns a mandelbox and sends it the configuration; returns once the session is ready.
    pub async fn start_session(&self) -> Result<ReadySession, SessionError> {
        let started = Instant::now();
        let assignment = self.assign().await?;
        let assign_time = started.elapsed();
        let started = Instant::now();
        let ports = self.send_config(&assignment).await?;
        Ok(ReadySession {
            assignment,
            ports,
            assign_time,
            transport_time: started.elapsed(),
        })
    }

    pub async fn assign(&self) -> Result<Assignment, SessionError> {
        #[derive(Deserialize)]
        struct Reply {
            ip: String,
            mandelbox_id: MandelboxId,
            #[serde(default)]
            error: String,
        }
        let mut body = json!({
            "regions": self.options.regions,
            "client_commit_hash": self.options.client_commit,
            "version": env!("CARGO_PKG_VERSION"),
        });
        if let Identity::User(user) = &self.options.identity {
            body["user_id"] = json!(user);
        }
        let (status, text) = self
            .send("assign", reqwest::Method::POST, "mandelbox/assign", &body)
            .await?;
        match serde_json::from_str::<Reply>(&text) {
            Ok(reply) if status.is_success() && reply.error.is_empty() => {
                let ip = reply.ip.parse().map_err(|_| {
                    SessionError::Session(format!("assign returned an invalid ip {:?}", reply.ip))
                })?;
                Ok(Assignment {
                    ip,
                    mandelbox_id: reply.mandelbox_id,
                })
            }
            Ok(reply) if !reply.error.is_empty() => Err(SessionError::Refused(reply.error)),
            _ => Err(SessionError::Status {
                step: "assign",
                status,
                body: text,
            }),
        }
    }

    /// Sends the configuration through the scaling-service, which forwards it to the host of
    /// this mandelbox; the reply comes once the mandelbox is ready.
    pub async fn send_config(&self, assignment: &Assignment) -> Result<SessionPorts, SessionError> {
        #[derive(Deserialize)]
        struct Reply {
            result: SessionPorts,
        }
        let body = json!({
            "mandelbox_id": assignment.mandelbox_id,
            "json_data": self.options.config.to_string(),
            "ip": assignment.ip.to_string(),
        });
        let (status, text) = self
            .send(
                "json_transport",
                reqwest::Method::PUT,
                "json_transport",
                &body,
            )
            .await?;
        match serde_json::from_str::<Reply>(&text) {
            Ok(reply) if status.is_success() => Ok(reply.result),
            _ => Err(SessionError::Status {
                step: "json_transport",
                status,
                body: text,
            }),
        }
    }

    /// Sends `body` as JSON to `path` under the scaling-service, as the caller; returns the
    /// status and the body's text. `step` names the call in errors.
    async fn send(
        &self,
        step: &'static str,
        method: reqwest::Method,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(reqwest::StatusCode, String), SessionError> {
        let mut url = self.options.scaling_url.clone();
        url.set_path(&format!("{}/{path}", url.path().trim_end_matches('/')));
        let mut request = self.http.request(method, url).json(body);
        if let Identity::Token(token) = &self.options.identity {
            request = request.bearer_auth(token);
        }
        let http = |source| SessionError::Http { step, source };
        let response = request.send().await.map_err(http)?;
        let status = response.status();
        let text = response.text().await.map_err(http)?;
        Ok((status, text))
    }
}

/// Asks the session's protocol port for its status line (what a client's first contact does).
pub async fn probe(session: &ReadySession) -> Result<String, SessionError> {
    exchange(session, "HELLO").await
}

/// Ends the session: says `END` on the protocol port, then waits until the mandelbox has stopped
/// listening (its container is gone) or `wait` has passed.
pub async fn end(session: &ReadySession, wait: Duration) -> Result<(), SessionError> {
    let reply = exchange(session, "END").await?;
    if reply.trim() != "bye" {
        return Err(SessionError::Session(format!(
            "the mandelbox answered END with {reply:?}"
        )));
    }
    let address = protocol_address(session);
    let deadline = Instant::now() + wait;
    while TcpStream::connect(address).await.is_ok() {
        if Instant::now() >= deadline {
            return Err(SessionError::Session(format!(
                "{address} still accepts connections {wait:?} after END"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn protocol_address(session: &ReadySession) -> SocketAddr {
    SocketAddr::new(session.assignment.ip, session.ports.port_32262)
}

async fn exchange(session: &ReadySession, line: &str) -> Result<String, SessionError> {
    let address = protocol_address(session);
    let talk = async {
        let mut stream = TcpStream::connect(address).await?;
        stream.write_all(format!("{line}\n").as_bytes()).await?;
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply).await?;
        Ok::<_, std::io::Error>(reply)
    };
    match tokio::time::timeout(Duration::from_secs(10), talk).await {
        Ok(Ok(reply)) => Ok(reply.trim_end().to_owned()),
        Ok(Err(error)) => Err(SessionError::Session(format!("talk to {address}: {error}"))),
        Err(_) => Err(SessionError::Session(format!("{address} did not answer"))),
    }
}
