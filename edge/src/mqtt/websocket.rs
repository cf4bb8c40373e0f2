//! MQTT over WebSocket: the HTTP upgrade (path and subprotocol `mqtt` checked), and the
//! WebSocket adapted into the byte stream the connection code reads and writes.
//!
//! MQTT over WebSocket (MQTT 5.0 section 6) carries the packets in binary messages with no
//! alignment between the two: a packet may span messages and a message may hold several
//! packets, so the adapter hands on the bytes of each binary message in order and the MQTT
//! decoder finds the packets in them. A text message breaks the protocol and ends the
//! connection with an error; a close message ends it as end-of-stream does on TCP. Pings are
//! answered by tungstenite. Each write of the connection goes out as one binary message.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// The WebSocket subprotocol of MQTT (3.1.1 and 5.0 alike).
pub(crate) const SUBPROTOCOL: &str = "mqtt";

/// Why a WebSocket upgrade was refused, or failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpgradeError {
    /// Not a usable WebSocket upgrade: another path, no `mqtt` subprotocol, not HTTP.
    #[error("WebSocket upgrade refused: {0}")]
    Refused(WsError),
}

/// Answers the HTTP upgrade on `stream`: a GET of `path` offering the subprotocol `mqtt`
/// becomes a WebSocket; anything else gets an HTTP error (404 for another path, 400 without
/// the subprotocol) and the connection closes. `max_message`: the largest WebSocket message
/// accepted (larger ones end the connection). The caller bounds the time it may take.
pub(crate) async fn accept<S>(
    stream: S,
    path: &str,
    max_message: usize,
) -> Result<WebSocketBytes<S>, UpgradeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // The callback's signature is tungstenite's: its error is the HTTP response itself.
    #[allow(clippy::result_large_err)]
    let check = |request: &Request, mut response: Response| {
        let refuse = |status: StatusCode, body: String| -> ErrorResponse {
            let mut refusal = ErrorResponse::new(Some(body));
            *refusal.status_mut() = status;
            refusal
        };
        if request.uri().path() != path {
            return Err(refuse(
                StatusCode::NOT_FOUND,
                format!("MQTT over WebSocket is served on {path}\n"),
            ));
        }
        if !offers_mqtt(request) {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "offer the WebSocket subprotocol \"mqtt\" (Sec-WebSocket-Protocol: mqtt)\n".into(),
            ));
        }
        response.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(SUBPROTOCOL),
        );
        Ok(response)
    };
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(max_message);
    config.max_frame_size = Some(max_message);
    let ws = tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(config))
        .await
        .map_err(UpgradeError::Refused)?;
    Ok(WebSocketBytes {
        ws,
        unread: Bytes::new(),
    })
}

/// Whether the request's `Sec-WebSocket-Protocol` headers list `mqtt`.
fn offers_mqtt(request: &Request) -> bool {
    request
        .headers()
        .get_all("Sec-WebSocket-Protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case(SUBPROTOCOL))
}

/// A WebSocket as a byte stream: reads return the bytes of its binary messages in order,
/// writes send binary messages.
pub(crate) struct WebSocketBytes<S> {
    ws: WebSocketStream<S>,
    /// The part of the latest binary message not read yet.
    unread: Bytes,
}

fn io_error(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => io::ErrorKind::BrokenPipe.into(),
        e => io::Error::new(io::ErrorKind::InvalidData, e),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WebSocketBytes<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.unread.is_empty() {
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => self.unread = data,
                // Answered (pings) or of no meaning to MQTT.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a WebSocket text message: MQTT is carried in binary messages",
                    )))
                }
                // End of stream, as a TCP FIN is.
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            }
        }
        let n = self.unread.len().min(buf.remaining());
        buf.put_slice(&self.unread[..n]);
        self.unread.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WebSocketBytes<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(io_error)?;
        Pin::new(&mut self.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(io_error)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(io_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.ws).poll_close(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(io_error(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::SinkExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    /// A server side (through `accept`) and a client side on an in-memory pipe; `protocol`:
    /// the subprotocol the client offers.
    async fn pair(
        path: &str,
        protocol: Option<&str>,
    ) -> (
        Result<WebSocketBytes<tokio::io::DuplexStream>, UpgradeError>,
        Result<WebSocketStream<tokio::io::DuplexStream>, WsError>,
    ) {
        let (server, client) = tokio::io::duplex(1 << 16);
        let mut request = format!("ws://edge{path}").into_client_request().unwrap();
        if let Some(p) = protocol {
            request
                .headers_mut()
                .insert("Sec-WebSocket-Protocol", p.parse().unwrap());
        }
        let (s, c) = tokio::join!(
            accept(server, "/mqtt", 1 << 20),
            tokio_tungstenite::client_async(request, client)
        );
        (s, c.map(|(ws, _)| ws))
    }

    #[tokio::test]
    async fn packets_are_read_across_and_within_messages() {
        let (server, client) = pair("/mqtt", Some("mqtt")).await;
        let (mut server, mut client) = (server.unwrap(), client.unwrap());
        // A PINGREQ and the first half of a PUBLISH in one message, the rest in the next.
        let publish = [0x30, 0x05, 0x00, 0x01, b't', b'h', b'i'];
        let mut first = vec![0xC0, 0x00];
        first.extend_from_slice(&publish[..3]);
        client.send(Message::binary(first)).await.unwrap();
        client.send(Message::Ping(Bytes::new())).await.unwrap();
        client
            .send(Message::binary(publish[3..].to_vec()))
            .await
            .unwrap();
        let mut got = vec![0u8; 2 + publish.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..2], [0xC0, 0x00]);
        assert_eq!(&got[2..], publish);
        server.write_all(&[0xD0, 0x00]).await.unwrap();
        server.flush().await.unwrap();
        use futures_util::StreamExt;
        let reply = loop {
            match client.next().await.unwrap().unwrap() {
                Message::Binary(b) => break b,
                Message::Pong(_) => continue,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(&reply[..], [0xD0, 0x00]);
        client.close(None).await.unwrap();
        let mut rest = Vec::new();
        assert_eq!(
            server.read_to_end(&mut rest).await.unwrap(),
            0,
            "close is end of stream"
        );
    }

    #[tokio::test]
    async fn a_text_message_is_an_error() {
        let (server, client) = pair("/mqtt", Some("mqtt")).await;
        let (mut server, mut client) = (server.unwrap(), client.unwrap());
        client.send(Message::text("hello")).await.unwrap();
        let err = server.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn another_path_or_no_subprotocol_is_refused() {
        let (server, client) = pair("/other", Some("mqtt")).await;
        assert!(server.is_err());
        match client.unwrap_err() {
            WsError::Http(r) => assert_eq!(r.status(), StatusCode::NOT_FOUND),
            e => panic!("{e}"),
        }
        let (server, client) = pair("/mqtt", None).await;
        assert!(server.is_err());
        match client.unwrap_err() {
            WsError::Http(r) => assert_eq!(r.status(), StatusCode::BAD_REQUEST),
            e => panic!("{e}"),
        }
        let (server, client) = pair("/mqtt", Some("wamp, mqtt")).await;
        assert!(server.is_ok() && client.is_ok());
    }
}
