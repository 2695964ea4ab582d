use super::connect::to_origin_form;
use super::*;
use http::{Request, header};

fn upstream(n: usize, balance: Balance) -> Upstream {
    let backends: Vec<BackendAddress> = (0..n)
        .map(|i| BackendAddress::plain(format!("10.0.0.{i}:80").parse().expect("authority")))
        .collect();
    Upstream::new(
        &backends,
        &[],
        Mode::Tag,
        balance,
        &Timeouts::default(),
        0,
        Arc::new(Metrics::default()),
    )
    .expect("plain backends")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[tokio::test]
async fn least_connections_spreads_and_skips_backends_that_are_down() {
    let up = upstream(2, Balance::LeastConn);
    let a = up.attach(ip("198.18.0.1"));
    let b = up.attach(ip("198.18.0.2"));
    assert_ne!(a.backend().authority(), b.backend().authority());
    a.backend().health.record_failure();
    for _ in 0..4 {
        let c = up.attach(ip("198.18.0.3"));
        assert_eq!(c.backend().authority(), b.backend().authority());
    }
}

#[tokio::test]
async fn hashing_keeps_a_client_on_one_backend() {
    let up = upstream(5, Balance::Hash);
    let first = up.attach(ip("198.18.0.9")).backend().authority().clone();
    for _ in 0..10 {
        assert_eq!(up.attach(ip("198.18.0.9")).backend().authority(), &first);
    }
    let spread: std::collections::HashSet<_> = (0..50)
        .map(|i| {
            up.attach(ip(&format!("198.18.1.{i}")))
                .backend()
                .authority()
                .clone()
        })
        .collect();
    assert!(spread.len() > 1);
}

#[test]
fn upstream_requests_take_the_origin_form_and_keep_the_clients_host() {
    let up = upstream(1, Balance::LeastConn);
    let backend = &up.backends()[0];
    let mut absolute = Request::get("http://elsewhere/a/b?c=d")
        .body(())
        .expect("request");
    to_origin_form(&mut absolute, backend).expect("valid");
    assert_eq!(absolute.uri(), "/a/b?c=d");
    assert_eq!(absolute.headers()[header::HOST], "10.0.0.0:80");
    let mut origin = Request::get("/x")
        .header(header::HOST, "intranet.example")
        .body(())
        .expect("request");
    to_origin_form(&mut origin, backend).expect("valid");
    assert_eq!(origin.uri(), "/x");
    assert_eq!(origin.headers()[header::HOST], "intranet.example");
}

/// Every request's exchange future is built and moved into its parent's (memcpy'd) at each level:
/// a connection held by value there must stay small (the TLS state is boxed) and dialling, which
/// keep-alive requests never do, is boxed.
#[tokio::test]
async fn an_exchange_future_stays_small() {
    let up = upstream(1, Balance::LeastConn);
    let mut state = up.attach(ip("198.18.0.1"));
    let req = Request::get("/")
        .body(ClientBody::new(http_body_util::Empty::<bytes::Bytes>::new()))
        .expect("request");
    let size = std::mem::size_of_val(&up.exchange(&mut state, ip("198.18.0.1"), req, b""));
    assert!(size <= 3_500, "the exchange future takes {size} bytes");
}
