//! R10 and R11: no secret reaches a log line, a `Debug` string or an error message.

mod common;

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{client, get, ok, unauthorized, TestServer};
use tower::{ServiceBuilder, ServiceExt};
use tower_token_refresh::{source, Error, RefreshLayer, Token};

const SECRETS: [&str; 3] = ["access-secret-1", "access-secret-2", "refresh-secret-9"];

/// A log sink that keeps everything written to it.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn r10_r11_secrets_stay_out_of_logs_debug_output_and_errors() {
    let sink = Sink::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let api = TestServer::start(|request| async move {
        if request.bearer().as_deref() == Some(SECRETS[1]) {
            ok("")
        } else {
            unauthorized("invalid_token")
        }
    })
    .await;
    let calls = Arc::new(Mutex::new(0));
    let counter = Arc::clone(&calls);
    let source = source::from_fn(move |_previous| {
        let n = {
            let mut calls = counter.lock().unwrap();
            *calls += 1;
            *calls
        };
        async move {
            if n > 2 {
                return Err(Error::terminal(std::io::Error::other("revoked")));
            }
            Ok(Token::new(SECRETS[n - 1])
                .with_refresh_token(SECRETS[2])
                .with_expires_in(Duration::from_secs(3600)))
        }
    });
    let layer = RefreshLayer::new(source).failure_backoff(Duration::ZERO);
    let handle = layer.handle();
    let service = ServiceBuilder::new().layer(layer.clone()).service(client());

    // A first fetch, a rejection, a refresh and a retry, then a failed refresh.
    let response = service.clone().oneshot(get(&api.url("/"))).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    handle.invalidate();
    let error = service
        .clone()
        .oneshot(get(&api.url("/")))
        .await
        .unwrap_err();

    let mut texts = vec![
        String::from_utf8(sink.0.lock().unwrap().clone()).unwrap(),
        format!("{layer:?}"),
        format!("{service:?}"),
        format!("{handle:?}"),
        format!("{:?}", handle.token_info()),
        format!("{:?}", handle.current_token()),
        format!("{error} {error:?}"),
    ];
    if let Some(error) = error.downcast_ref::<Error>() {
        texts.push(format!("{error:#?}"));
    }
    assert!(texts[0].contains("token refreshed"), "the log was captured");
    for text in &texts {
        for secret in SECRETS {
            assert!(!text.contains(secret), "{secret} leaked into: {text}");
        }
    }
}
