//! `GET /`: a status page of every cluster for a browser or a wall screen. The page, its
//! script and its style sheet are compiled in and hold no data: the script reads the API like
//! any other client, so they are served without a token (see [`PATHS`]).

use std::sync::LazyLock;

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

use super::AppState;

const PAGE_PATH: &str = "/";
const SCRIPT_PATH: &str = "/static/status.js";
const STYLE_PATH: &str = "/static/status.css";

/// The paths of the page and its assets: open to reads whatever the API tokens, like
/// `/health`.
pub const PATHS: [&str; 3] = [PAGE_PATH, SCRIPT_PATH, STYLE_PATH];

/// Only the compiled-in script and style sheet may run or apply, and the script may only talk
/// to this daemon; no inline code, no framing, and forms may not submit anywhere (so a token
/// typed into the page can never end up in a URL).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// One compiled-in file and how to serve it.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    etag: HeaderValue,
}

impl Asset {
    fn new(body: &'static str, content_type: &'static str) -> Self {
        let digest = hex::encode(&Sha256::digest(body.as_bytes())[..12]);
        let etag = HeaderValue::from_str(&format!("W/\"{digest}\""))
            .expect("a hex digest in quotes is a valid header value");
        Self {
            body,
            content_type,
            etag,
        }
    }

    /// The file, or `304 Not Modified` when the client holds this version.
    fn serve(&self, request: &HeaderMap) -> Response {
        let fresh = request
            .get(header::IF_NONE_MATCH)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|tags| {
                tags.split(',')
                    .any(|tag| tag.trim() == "*" || tag.trim() == self.etag)
            });
        let headers = [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(self.content_type),
            ),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CONTENT_SECURITY_POLICY),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            // Revalidate every time: a new daemon version must not run an old script.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (header::ETAG, self.etag.clone()),
        ];
        if fresh {
            (StatusCode::NOT_MODIFIED, headers).into_response()
        } else {
            (headers, self.body).into_response()
        }
    }
}

static PAGE: LazyLock<Asset> =
    LazyLock::new(|| Asset::new(include_str!("status_page.html"), "text/html; charset=utf-8"));
static SCRIPT: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        include_str!("status_page.js"),
        "text/javascript; charset=utf-8",
    )
});
static STYLE: LazyLock<Asset> =
    LazyLock::new(|| Asset::new(include_str!("status_page.css"), "text/css; charset=utf-8"));

/// The routes of the page and its assets.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route(PAGE_PATH, get(|h: HeaderMap| async move { PAGE.serve(&h) }))
        .route(
            SCRIPT_PATH,
            get(|h: HeaderMap| async move { SCRIPT.serve(&h) }),
        )
        .route(
            STYLE_PATH,
            get(|h: HeaderMap| async move { STYLE.serve(&h) }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_script_and_style_sheet() {
        let page = PAGE.body;
        assert!(page.contains(&format!("<script src=\"{SCRIPT_PATH}\"")));
        assert!(page.contains(&format!("href=\"{STYLE_PATH}\"")));
        // Inline code would be blocked by the policy; anything fetched elsewhere too.
        assert_eq!(page.matches("<script").count(), 1, "one external script");
        assert!(!page.contains("<style"), "no inline style sheet");
        assert!(!page.contains(" style="), "no inline styles");
        assert!(!page.contains("http://") && !page.contains("https://"));
    }

    #[test]
    fn the_script_never_writes_markup_from_data() {
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!SCRIPT.body.contains(sink), "{sink} in the script");
        }
        assert!(
            !SCRIPT.body.contains("new EventSource"),
            "EventSource cannot send the token in a header"
        );
    }

    #[test]
    fn a_matching_if_none_match_is_answered_304() {
        let mut request = HeaderMap::new();
        request.insert(header::IF_NONE_MATCH, PAGE.etag.clone());
        assert_eq!(PAGE.serve(&request).status(), StatusCode::NOT_MODIFIED);
        request.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("W/\"other\""),
        );
        assert_eq!(PAGE.serve(&request).status(), StatusCode::OK);
    }
}
