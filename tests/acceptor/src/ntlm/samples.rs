//! The sample messages of MS-NLMP section 4.2.4 (NTLMv2), for tests of the acceptor and of its
//! clients.

fn hex(s: &str) -> Vec<u8> {
    let s: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    s.chunks(2)
        .map(|p| {
            let d = |c: u8| (c as char).to_digit(16).map_or(0, |v| v as u8);
            d(p[0]) << 4 | d(p[1])
        })
        .collect()
}

/// The AUTHENTICATE_MESSAGE of MS-NLMP 4.2.4.3 (NTLMv2; user "User", domain "Domain",
/// workstation "COMPUTER", server challenge 0123456789abcdef, password "Password").
pub fn ms_nlmp_4_2_4_3() -> Vec<u8> {
    hex(
        "4e544c4d53535000 03000000 18001800 6c000000 54005400 84000000 0c000c00 48000000
         08000800 54000000 10001000 5c000000 10001000 d8000000 358288e2 0501280a 0000000f
         44006f006d00610069006e00 5500730065007200 43004f004d0050005500540045005200
         86c35097ac9cec102554764a57cccc19aaaaaaaaaaaaaaaa
         68cd0ab851e51c96aabc927bebef6a1c 0101000000000000 0000000000000000 aaaaaaaaaaaaaaaa
         00000000 02000c0044006f006d00610069006e00 01000c005300650072007600650072000000
         0000 00000000 c5dad2544fc9799094ce1ce90bc9d03e",
    )
}
