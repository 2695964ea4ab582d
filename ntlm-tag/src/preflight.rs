//! Everything `run` would load or look up before it binds and attaches, checked up front by `check`
//! and by `run` alike (like `nginx -t`): certificates and keys (parsed and paired), the `user`, the
//! XDP interfaces, and the backends' names. A failure is a configuration error naming its key, so
//! both exit 64 and systemd does not restart a gateway that can never start.
#![forbid(unsafe_code)]

use std::net::ToSocketAddrs;

use crate::{
    config::{Config, ConfigError},
    kernel::{privileges, support},
    proxy::tls,
};

/// Checks what the configuration names outside itself. The admin token file is already read (and
/// its mode checked) by [`Config::load`].
pub fn verify(config: &Config) -> Result<(), ConfigError> {
    for listener in config.listeners.iter().filter(|l| !l.tls.is_empty()) {
        tls::acceptor(&listener.tls, config.http2).map_err(|e| ConfigError::Invalid {
            key: "listen.tls",
            message: format!("listener {}: {e}", listener.address),
        })?;
    }
    if let Some(user) = &config.user {
        privileges::lookup_user(user).map_err(|e| ConfigError::Invalid {
            key: "user",
            message: e.to_string(),
        })?;
    }
    if let Some(missing) = config
        .ebpf
        .xdp_interfaces
        .iter()
        .find(|i| !support::interface_exists(i))
    {
        return Err(ConfigError::Invalid {
            key: "xdp",
            message: format!(
                "no interface {missing:?} in this network namespace (see `ip link`; start the \
                 gateway in the namespace that has it)"
            ),
        });
    }
    for backend in &config.all_backends() {
        let host = backend.authority.host().trim_matches(['[', ']']);
        let port = backend
            .authority
            .port_u16()
            .unwrap_or(if backend.tls.is_some() { 443 } else { 80 });
        resolve((host, port)).map_err(|message| ConfigError::Invalid {
            key: "backends",
            message,
        })?;
    }
    Ok(())
}

/// Resolves a backend's host and port with the system resolver, as the upstream connector will on
/// every connect.
fn resolve((host, port): (&str, u16)) -> Result<(), String> {
    match (host, port).to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(format!("{host:?} (port {port}) resolves to no address")),
        Err(e) => Err(format!("cannot resolve {host:?} (port {port}): {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::RunArgs;

    fn config(extra: &str) -> Config {
        Config::from_toml(
            &format!("listen = [\"127.0.0.1:8080\"]\nbackends = [\"127.0.0.1:8081\"]\n{extra}"),
            &RunArgs::default(),
        )
        .expect("valid syntax")
    }

    fn key_of(result: Result<(), ConfigError>) -> &'static str {
        match result {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid key, got {other:?}"),
        }
    }

    #[test]
    fn a_plain_configuration_passes() {
        verify(&config("")).expect("loopback backend, no TLS, no user");
    }

    #[test]
    fn what_run_would_fail_on_is_named_by_key() {
        assert_eq!(
            key_of(verify(&config("user = \"no-such-user-7f3a\""))),
            "user"
        );
        assert_eq!(
            key_of(verify(&config(
                "xdp = [\"nosuch7f3a\"]\ntrusted_lbs = [\"10.0.0.0/8\"]"
            ))),
            "xdp"
        );
        let unresolvable = Config::from_toml(
            "listen = [\"127.0.0.1:8080\"]\nbackends = [\"no-such-host.invalid:80\"]",
            &RunArgs::default(),
        )
        .expect("valid syntax");
        assert_eq!(key_of(verify(&unresolvable)), "backends");
        let missing_cert = Config::from_toml(
            "listen = [{ address = \"127.0.0.1:8443\", tls = [{ cert = \"/nonexistent/c.pem\", \
             key = \"/nonexistent/c.key\" }] }]\nbackends = [\"127.0.0.1:8081\"]",
            &RunArgs::default(),
        )
        .expect("valid syntax");
        assert_eq!(key_of(verify(&missing_cert)), "listen.tls");
    }
}
