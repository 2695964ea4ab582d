use super::*;

fn scrape(m: &Metrics, kernel: Option<(&KernelCounters, u32)>) -> String {
    m.render(Scrape {
        connections_open: 3,
        kernel,
        backends: vec![BackendUp {
            route: "/owa".to_string(),
            backend: "10.0.0.5:8080".to_string(),
            up: false,
        }],
        auth_states: [3, 0, 0, 0],
        lockout: LockoutTotals::default(),
    })
}

#[test]
fn responses_count_by_backend_and_status_through_the_cached_series() {
    let m = Metrics::new();
    for _ in 0..3 {
        m.request("10.0.0.5:8080", 200, Duration::ZERO);
    }
    m.request("10.0.0.6:8080", 200, Duration::ZERO);
    m.request("10.0.0.5:8080", 401, Duration::ZERO);
    m.request("-", 431, Duration::ZERO);
    // Outside the cached range: still counted, through the family.
    m.request("-", 999, Duration::ZERO);
    m.upstream_request(UpstreamUse::Reused);
    m.upstream_request(UpstreamUse::Reused);
    let text = scrape(&m, None);
    for line in [
        "ntlm_tag_requests_total{backend=\"10.0.0.5:8080\",status=\"200\"} 3",
        "ntlm_tag_requests_total{backend=\"10.0.0.6:8080\",status=\"200\"} 1",
        "ntlm_tag_requests_total{backend=\"10.0.0.5:8080\",status=\"401\"} 1",
        "ntlm_tag_requests_total{backend=\"-\",status=\"431\"} 1",
        "ntlm_tag_requests_total{backend=\"-\",status=\"999\"} 1",
        "ntlm_tag_upstream_connections_total{kind=\"reused\"} 2",
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
}

#[test]
fn the_names_dashboards_use_are_kept() {
    let m = Metrics::new();
    let text = scrape(&m, Some((&KernelCounters::default(), 1024)));
    for name in [
        "ntlm_tag_connections_total{source=\"kernel-peer\"} 0",
        "ntlm_tag_connections_open 3",
        "ntlm_tag_connections_refused_total 0",
        "ntlm_tag_connections_reset_before_identified_total 0",
        "ntlm_tag_proxy_protocol_rejected_total{reason=\"untrusted\"} 0",
        "ntlm_tag_upstream_connections_total{kind=\"reused\"} 0",
        "ntlm_tag_pinned_connections 0",
        "ntlm_tag_bound_connections 0",
        "ntlm_tag_upstream_bindings_total{trigger=\"response\"} 0",
        "ntlm_tag_upstream_failovers_total 0",
        "ntlm_tag_upstream_retired_total{cap=\"max_requests\"} 0",
        "ntlm_tag_upgraded_connections_total 0",
        "ntlm_tag_epa_refusals_total{cause=\"certificate_differs\"} 0",
        "ntlm_tag_ntlm_messages_total{type=\"spnego\"} 0",
        "ntlm_tag_errors_total{origin=\"client\"} 0",
        "ntlm_tag_upstream_errors_total{kind=\"timeout\"} 0",
        "ntlm_tag_kernel_map_records 0",
        "ntlm_tag_kernel_map_capacity 1024",
        "ntlm_tag_kernel_events_total{event=\"lookup_miss\"} 0",
        "ntlm_tag_backend_up{backend=\"10.0.0.5:8080\",route=\"/owa\"} 0",
        "ntlm_tag_config_reloads_total{result=\"failure\"} 0",
        "ntlm_tag_config_last_reload_successful 1",
        "ntlm_tag_build_info{version=\"",
        "ntlm_tag_connections_by_auth_state{state=\"anonymous\"} 3",
        "ntlm_tag_lockout_failures_total 0",
        "ntlm_tag_lockout_refused_total{key=\"user_at_address\"} 0",
        "ntlm_tag_lockout_tracked_keys 0",
        "ntlm_tag_lockout_evicted_total 0",
        "# TYPE ntlm_tag_request_duration_seconds histogram",
        "# TYPE ntlm_tag_upstream_connect_duration_seconds histogram",
        "# TYPE ntlm_tag_ntlm_handshake_duration_seconds histogram",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
}

#[test]
fn kernel_totals_advance_counters_and_never_move_them_back() {
    let m = Metrics::new();
    let mut k = KernelCounters::default();
    k.set(KernelEvent::Recorded, 5);
    assert!(scrape(&m, Some((&k, 8))).contains("event=\"recorded\"} 5"));
    k.set(KernelEvent::Recorded, 9);
    assert!(scrape(&m, Some((&k, 8))).contains("event=\"recorded\"} 9"));
    // A smaller total (a reset map) never lowers a counter.
    k.set(KernelEvent::Recorded, 2);
    assert!(scrape(&m, Some((&k, 8))).contains("event=\"recorded\"} 9"));
}

#[test]
fn errors_and_reloads_are_counted_where_they_happen() {
    let m = Metrics::new();
    m.proxy_rejected(ProxyRejection::Timeout);
    m.tls_failed();
    m.upstream_timeout();
    m.reload(ReloadResult::Failure);
    let text = scrape(&m, None);
    assert!(
        text.contains("ntlm_tag_errors_total{origin=\"client\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("ntlm_tag_errors_total{origin=\"upstream\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("ntlm_tag_config_last_reload_successful 0"),
        "{text}"
    );
}
