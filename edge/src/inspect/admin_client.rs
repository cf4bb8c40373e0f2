//! The client side of the admin API, for `edge read --admin` and `edge topics --admin`: a
//! running node holds its data directory, so it is read through the API it serves. One
//! HTTP/1.1 connection per request (hyper's client half; axum already brings hyper), each
//! bounded by [`REQUEST_TIMEOUT`].

use std::time::Duration;

use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper::header;
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;

use super::{RecordView, RecordsAnswer, TopicView, TopicsAnswer};

/// Longest a request may take, connecting included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Most records one request asks for (the API's own cap).
pub const PAGE: usize = 1000;

/// Why the admin API could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminClientError {
    /// The URL given is not an `http://host:port` URL.
    #[error("--admin {url:?}: {why} (give the admin endpoint as http://HOST:PORT, e.g. http://127.0.0.1:8080)")]
    BadUrl {
        /// What was given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// Nothing answered at the address, or the answer did not come in time.
    #[error("the admin endpoint {url} does not answer: {why} (is the edge running, with its admin endpoint on that address?)")]
    Unreachable {
        /// The endpoint.
        url: String,
        /// The connection error.
        why: String,
    },
    /// 401 or 403: no token, or the wrong one.
    #[error("the admin endpoint {url} refused the request ({status}): {}", refusal(.token_source.as_deref()))]
    Refused {
        /// The endpoint.
        url: String,
        /// 401 or 403.
        status: u16,
        /// Where the token sent came from, if one was sent.
        token_source: Option<String>,
    },
    /// The log has no such topic.
    #[error("the edge at {url} has no topic {topic:?} (edge topics --admin {url} lists them)")]
    UnknownTopic {
        /// The endpoint.
        url: String,
        /// The topic asked for.
        topic: String,
    },
    /// Any other answer than 200.
    #[error("the admin endpoint {url} answered {path} with {status}: {message}")]
    Status {
        /// The endpoint.
        url: String,
        /// The path asked for.
        path: String,
        /// The status.
        status: u16,
        /// The error the API gave, or the start of its body.
        message: String,
    },
    /// A 200 whose body is not the document expected (another service on that port?).
    #[error("the admin endpoint {url} answered {path} with something that is not a Tributary edge's answer: {why}")]
    BadAnswer {
        /// The endpoint.
        url: String,
        /// The path asked for.
        path: String,
        /// The decoding error.
        why: String,
    },
}

fn refusal(token_source: Option<&str>) -> String {
    match token_source {
        None => "it needs a token: give --token-file FILE (or set TRIBUTARY_ADMIN_TOKEN or TRIBUTARY_ADMIN_TOKEN_FILE)".to_string(),
        Some(source) => format!("the token from {source} is not the edge's admin token"),
    }
}

/// A bearer token and where it came from, for error messages (never the token itself).
#[derive(Clone)]
pub struct Token {
    value: String,
    source: String,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token(from {})", self.source)
    }
}

impl Token {
    /// A token, with `source` naming where it came from (`--token-file /etc/x`).
    pub fn new(value: String, source: String) -> Token {
        Token { value, source }
    }
}

/// The admin API of one running edge.
#[derive(Debug, Clone)]
pub struct AdminClient {
    /// `http://host:port`, as shown in errors.
    url: String,
    /// `host:port`, connected to and sent as `Host`.
    authority: String,
    /// A path the API sits under (empty, or `/prefix` behind a proxy).
    prefix: String,
    token: Option<Token>,
}

impl AdminClient {
    /// A client of the admin endpoint at `url` (`http://HOST:PORT`, or `HOST:PORT`).
    pub fn new(url: &str, token: Option<Token>) -> Result<AdminClient, AdminClientError> {
        let bad = |why: &str| AdminClientError::BadUrl {
            url: url.to_string(),
            why: why.to_string(),
        };
        let full = if url.contains("://") {
            url.to_string()
        } else {
            format!("http://{url}")
        };
        let uri: Uri = full.parse().map_err(|e| bad(&format!("{e}")))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(bad(&format!(
                    "the scheme {other:?} is not served (the admin endpoint speaks plain HTTP)"
                )))
            }
            None => return Err(bad("no scheme")),
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if uri.query().is_some() {
            return Err(bad("a query is not part of the endpoint's address"));
        }
        let port = authority.port_u16().unwrap_or(80);
        let authority = format!("{}:{port}", authority.host());
        let prefix = uri.path().trim_end_matches('/').to_string();
        Ok(AdminClient {
            url: format!("http://{authority}{prefix}"),
            authority,
            prefix,
            token,
        })
    }

    /// The endpoint, as errors name it.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Every topic of the log, with its partitions' offsets.
    pub async fn topics(&self) -> Result<Vec<TopicView>, AdminClientError> {
        let path = "/api/v1/topics".to_string();
        let body = self.get(&path, None).await?;
        let answer: TopicsAnswer = self.decode(&path, &body)?;
        Ok(answer.topics)
    }

    /// Up to `limit` (at most [`PAGE`]) durable records of `topic`/`partition` from `from`.
    pub async fn records(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        limit: usize,
    ) -> Result<Vec<RecordView>, AdminClientError> {
        let path = format!(
            "/api/v1/topics/{}/partitions/{partition}/records?from={from}&limit={}",
            path_segment(topic),
            limit.clamp(1, PAGE)
        );
        let body = self.get(&path, Some(topic)).await?;
        let answer: RecordsAnswer = self.decode(&path, &body)?;
        Ok(answer.records)
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &[u8],
    ) -> Result<T, AdminClientError> {
        serde_json::from_slice(body).map_err(|e| AdminClientError::BadAnswer {
            url: self.url.clone(),
            path: path.to_string(),
            why: e.to_string(),
        })
    }

    /// GETs `path`; `topic` is the topic the path names, for a 404's error.
    async fn get(&self, path: &str, topic: Option<&str>) -> Result<Bytes, AdminClientError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(path)).await {
            Err(_) => {
                Err(self.unreachable(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs())))
            }
            Ok(Err(e)) => Err(e),
            Ok(Ok((status, body))) => match status {
                StatusCode::OK => Ok(body),
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    Err(AdminClientError::Refused {
                        url: self.url.clone(),
                        status: status.as_u16(),
                        token_source: self.token.as_ref().map(|t| t.source.clone()),
                    })
                }
                StatusCode::NOT_FOUND if topic.is_some() => Err(AdminClientError::UnknownTopic {
                    url: self.url.clone(),
                    topic: topic.unwrap_or_default().to_string(),
                }),
                other => Err(AdminClientError::Status {
                    url: self.url.clone(),
                    path: path.to_string(),
                    status: other.as_u16(),
                    message: error_message(&body),
                }),
            },
        }
    }

    async fn exchange(&self, path: &str) -> Result<(StatusCode, Bytes), AdminClientError> {
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| self.unreachable(e.to_string()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.unreachable(e.to_string()))?;
        // The connection is driven until the answer is read; it ends with this request.
        let driver = tokio::spawn(connection);
        let mut request = Request::get(format!("{}{path}", self.prefix))
            .header(header::HOST, &self.authority)
            .header(header::ACCEPT, "application/json");
        if let Some(t) = &self.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {}", t.value));
        }
        let request =
            request
                .body(Empty::<Bytes>::new())
                .map_err(|e| AdminClientError::BadUrl {
                    url: self.url.clone(),
                    why: e.to_string(),
                })?;
        let answer = async {
            let response = sender.send_request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        }
        .await;
        driver.abort();
        answer.map_err(|e| self.unreachable(e.to_string()))
    }

    fn unreachable(&self, why: String) -> AdminClientError {
        AdminClientError::Unreachable {
            url: self.url.clone(),
            why,
        }
    }
}

/// The `error` of a JSON error answer, else the start of the body as text.
fn error_message(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
            return e.to_string();
        }
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
    text.trim().to_string()
}

/// `topic` as one path segment: every byte but the unreserved ones percent-encoded.
fn path_segment(topic: &str) -> String {
    let mut out = String::with_capacity(topic.len());
    for b in topic.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_without_a_scheme_is_http() {
        let c = AdminClient::new("127.0.0.1:8080", None).unwrap();
        assert_eq!(c.url(), "http://127.0.0.1:8080");
        let c = AdminClient::new("http://localhost:9/edge/", None).unwrap();
        assert_eq!(c.url(), "http://localhost:9/edge");
        assert_eq!(c.authority, "localhost:9");
    }

    #[test]
    fn https_and_nonsense_are_refused_with_the_form_to_use() {
        for bad in [
            "https://127.0.0.1:8080",
            "http://",
            "http://a:b:c",
            "ftp://x",
        ] {
            let e = AdminClient::new(bad, None).unwrap_err().to_string();
            assert!(e.contains("http://HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_topic_is_one_path_segment() {
        assert_eq!(path_segment("tele metry/a%"), "tele%20metry%2Fa%25");
        assert_eq!(path_segment("plain-topic_1.x"), "plain-topic_1.x");
    }

    #[test]
    fn a_refusal_names_the_token_source_never_the_token() {
        let e = AdminClientError::Refused {
            url: "http://127.0.0.1:1".into(),
            status: 401,
            token_source: Some("--token-file /etc/t".into()),
        }
        .to_string();
        assert!(e.contains("--token-file /etc/t"), "{e}");
        let token = Token::new(
            "s3cret-s3cret-s3cret".into(),
            "TRIBUTARY_ADMIN_TOKEN".into(),
        );
        assert!(!format!("{token:?}").contains("s3cret"));
    }
}
