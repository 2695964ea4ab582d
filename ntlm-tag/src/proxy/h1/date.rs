//! The `date:` value every response carries (RFC 9110 §6.6.1), formatted once a second per
//! thread as hyper does, not once a response.
#![forbid(unsafe_code)]

use std::{
    cell::RefCell,
    time::{SystemTime, UNIX_EPOCH},
};

/// `Sun, 06 Nov 1994 08:49:37 GMT`
const DATE_LEN: usize = 29;

thread_local! {
    static CACHED: RefCell<(u64, [u8; DATE_LEN])> = const { RefCell::new((u64::MAX, [0; DATE_LEN])) };
}

/// Appends the current date.
pub fn extend(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != secs {
            let text = httpdate::fmt_http_date(now);
            if text.len() == DATE_LEN {
                cached.1.copy_from_slice(text.as_bytes());
                cached.0 = secs;
            } else {
                out.extend_from_slice(text.as_bytes());
                return;
            }
        }
        out.extend_from_slice(&cached.1);
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_date_is_an_http_date() {
        let mut out = Vec::new();
        super::extend(&mut out);
        let text = std::str::from_utf8(&out).expect("ascii");
        assert!(httpdate::parse_http_date(text).is_ok(), "{text}");
    }
}
