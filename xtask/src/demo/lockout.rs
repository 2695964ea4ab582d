//! The lockout scene: a client looping on a stale password is stopped by the gateway before the
//! domain controller would lock the account, while the same user logs in from elsewhere.

use ntlm_tag_tests::acceptor::{Acceptor, curl_ntlm};

use super::{Demo, HAPROXY_FRONT};

/// What the lockout scene saw.
pub struct LockoutScene {
    /// Final status of each login of the looping client.
    pub looping: Vec<String>,
    /// Type3s the backends refused (each one a bad password the domain controller would count).
    pub type3s_refused: usize,
    /// Who the right-password login from another address was served as.
    pub elsewhere: Vec<String>,
}

pub fn lockout_scene(demo: &Demo) -> LockoutScene {
    let url = format!("http://{HAPROXY_FRONT}/");
    let refused = || {
        demo.acceptors
            .iter()
            .flat_map(Acceptor::requests)
            .filter(|r| r["ntlm_message"] == 3 && r["status"] == 401)
            .count()
    };
    let before = refused();
    let looping = (0..6)
        .map(|_| {
            let run = curl_ntlm(
                &demo.topo.client,
                "198.18.11.11".parse().expect("ip"),
                "carol",
                "old-password",
                std::slice::from_ref(&url),
                &["-o", "/dev/null", "-w", "%{http_code}"],
            );
            run.stdout.trim().to_string()
        })
        .collect();
    let type3s_refused = refused() - before;
    let elsewhere = demo.curl("198.18.11.10", "carol", &url).users();
    LockoutScene {
        looping,
        type3s_refused,
        elsewhere,
    }
}

pub fn print_lockout(scene: &LockoutScene) {
    println!();
    println!(
        "{:<48} {:<24} {:<26} RESULT",
        "CLIENT", "LOGINS (FINAL STATUS)", "BAD PASSWORDS AT BACKEND"
    );
    println!(
        "{:<48} {:<24} {:<26} stopped at 4 (429 + Retry-After), before AD's 5th",
        "carol 198.18.11.11 via HAProxy, stale password",
        scene.looping.join(" "),
        scene.type3s_refused,
    );
    println!(
        "{:<48} {:<24} {:<26} {}",
        "carol 198.18.11.10 via HAProxy, right password",
        if scene.elsewhere.is_empty() {
            "-"
        } else {
            "200"
        },
        0,
        if scene.elsewhere == ["carol"] {
            "logged in as carol"
        } else {
            "NOT logged in"
        }
    );
    println!();
}
