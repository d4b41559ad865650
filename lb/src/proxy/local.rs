//! Answers the lb gives itself (404, 400, 502, 503, 504, and the HTTPS redirect), each
//! counted under its reason. Knows nothing of backends.

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode, Uri};

use super::body::ProxyBody;
use super::forwarded::X_REQUEST_ID;
use crate::metrics::LocalReason;
use crate::Shared;

/// The status of an answer the lb gives itself.
fn status(reason: LocalReason) -> StatusCode {
    match reason {
        LocalReason::NoRoute => StatusCode::NOT_FOUND,
        LocalReason::BadRequest => StatusCode::BAD_REQUEST,
        LocalReason::ClientTimeout => StatusCode::REQUEST_TIMEOUT,
        LocalReason::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        LocalReason::NoTable | LocalReason::NoBackend | LocalReason::BackendFull => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        LocalReason::UpstreamConnect | LocalReason::UpstreamError => StatusCode::BAD_GATEWAY,
        LocalReason::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
    }
}

/// A 308 to the same host and target over HTTPS; 308 keeps the method and body.
pub(super) fn redirect_to_https(
    shared: &Shared,
    host: &str,
    uri: &Uri,
    request_id: HeaderValue,
) -> Response<ProxyBody> {
    let port = shared.config.https_port;
    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let location = if port == 443 {
        format!("https://{host}{pq}")
    } else {
        format!("https://{host}:{port}{pq}")
    };
    let Ok(value) = HeaderValue::from_str(&location) else {
        return local(
            shared,
            LocalReason::BadRequest,
            "",
            "request target cannot be redirected",
            request_id,
        );
    };
    shared.metrics.https_redirects.inc();
    let mut resp = Response::new(ProxyBody::local(format!(
        "switchyard: this site is served over HTTPS: {location}\n"
    )));
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    let h = resp.headers_mut();
    h.insert(header::LOCATION, value);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(X_REQUEST_ID, request_id);
    resp
}

/// What the access log needs of an answer the lb gave itself (a response extension).
#[derive(Clone)]
pub(super) struct LocalAnswer {
    pub reason: LocalReason,
    pub route: Box<str>,
}

pub(super) fn local(
    shared: &Shared,
    reason: LocalReason,
    route: &str,
    msg: &str,
    request_id: HeaderValue,
) -> Response<ProxyBody> {
    shared
        .metrics
        .local_responses
        .with_label_values(&[route, reason.as_str()])
        .inc();
    let body = Bytes::from(format!("switchyard: {msg}\n"));
    let mut resp = Response::new(ProxyBody::local(body));
    *resp.status_mut() = status(reason);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(X_REQUEST_ID, request_id);
    match reason {
        // Full is a moment, not an outage: clients may come back soon.
        LocalReason::BackendFull => {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        // A deploy or an outage: instances come back in seconds.
        LocalReason::NoBackend | LocalReason::NoTable => {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        _ => {}
    }
    h.insert(
        HeaderName::from_static("x-switchyard-error"),
        HeaderValue::from_static(reason.as_str()),
    );
    let route = route.into();
    resp.extensions_mut().insert(LocalAnswer { reason, route });
    resp
}
