//! API errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`): user
//! mistakes are 4xx with a useful message; internal failures are 500 with a generic
//! message, the details going to the log.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
        }
    }

    /// Logs `detail` and tells the client only that something failed on our side.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {detail}");
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "internal error while generating; see the server log".into(),
        }
    }

    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            413 => "request_too_large",
            400..=499 => "invalid_request_error",
            503 => "server_overloaded",
            _ => "server_error",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": {"message": self.message, "type": self.kind(), "param": null, "code": null}
        });
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            // A full queue drains within seconds: say when to come back.
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        response
    }
}
