//! Bounds-checked little-endian readers and the security-buffer ("fields") layout.

use super::NtlmError;

pub const SIGNATURE: &[u8; 8] = b"NTLMSSP\0";

/// Signature (8) + MessageType (4).
const HEADER_LEN: usize = 12;

fn slice(buf: &[u8], offset: usize, len: usize) -> Result<&[u8], NtlmError> {
    let end = offset.checked_add(len).ok_or(NtlmError::TooShort {
        needed: usize::MAX,
        got: buf.len(),
    })?;
    buf.get(offset..end).ok_or(NtlmError::TooShort {
        needed: end,
        got: buf.len(),
    })
}

pub fn u16_at(buf: &[u8], offset: usize) -> Result<u16, NtlmError> {
    let b = slice(buf, offset, 2)?;
    Ok(u16::from_le_bytes([b[0], b[1]]))
}

pub fn u32_at(buf: &[u8], offset: usize) -> Result<u32, NtlmError> {
    let b = slice(buf, offset, 4)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Checks the signature and returns the MessageType.
pub fn header(buf: &[u8]) -> Result<u32, NtlmError> {
    if buf.len() < HEADER_LEN {
        return Err(NtlmError::TooShort {
            needed: HEADER_LEN,
            got: buf.len(),
        });
    }
    if !buf.starts_with(SIGNATURE) {
        return Err(NtlmError::BadSignature);
    }
    u32_at(buf, 8)
}

/// Checks the signature and that the message is of type `expected` and at least `min_len` long.
pub fn expect(buf: &[u8], expected: u32, min_len: usize) -> Result<(), NtlmError> {
    let got = header(buf)?;
    if got != expected {
        return Err(NtlmError::WrongType { expected, got });
    }
    if buf.len() < min_len {
        return Err(NtlmError::TooShort {
            needed: min_len,
            got: buf.len(),
        });
    }
    Ok(())
}

/// The payload a security buffer (Len u16, MaxLen u16, BufferOffset u32) at `at` points to.
/// An empty field is empty whatever its offset says (clients leave offsets of empty fields at 0).
pub fn field<'a>(buf: &'a [u8], at: usize, name: &'static str) -> Result<&'a [u8], NtlmError> {
    let len = usize::from(u16_at(buf, at)?);
    let offset = u32_at(buf, at + 4)?;
    if len == 0 {
        return Ok(&[]);
    }
    let offset =
        usize::try_from(offset).map_err(|_| NtlmError::FieldOutOfBounds { field: name })?;
    slice(buf, offset, len).map_err(|_| NtlmError::FieldOutOfBounds { field: name })
}

/// Decodes a string field: UTF-16LE when `unicode`, else an OEM string (read as Latin-1).
pub fn string(bytes: &[u8], unicode: bool, name: &'static str) -> Result<String, NtlmError> {
    if !unicode {
        return Ok(bytes.iter().map(|&b| char::from(b)).collect());
    }
    if !bytes.len().is_multiple_of(2) {
        return Err(NtlmError::BadUnicode { field: name });
    }
    let units = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]));
    char::decode_utf16(units)
        .collect::<Result<String, _>>()
        .map_err(|_| NtlmError::BadUnicode { field: name })
}

/// UTF-16LE bytes of `s`.
pub fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// Appends a security buffer header for a payload of `len` bytes at `offset`.
/// Callers keep payloads below 64 KiB; a longer one is cut to the field's maximum.
pub fn put_field(out: &mut Vec<u8>, len: usize, offset: usize) {
    let len = u16::try_from(len).unwrap_or(u16::MAX);
    let offset = u32::try_from(offset).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_rejects_offsets_past_the_end_and_overflow() {
        let mut msg = vec![0u8; 16];
        // len 4 at offset 14: runs past the 16-byte message.
        msg[0..2].copy_from_slice(&4u16.to_le_bytes());
        msg[4..8].copy_from_slice(&14u32.to_le_bytes());
        assert_eq!(
            field(&msg, 0, "x"),
            Err(NtlmError::FieldOutOfBounds { field: "x" })
        );
        msg[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            field(&msg, 0, "x"),
            Err(NtlmError::FieldOutOfBounds { field: "x" })
        );
        // The header itself is cut short.
        assert!(field(&msg, 12, "x").is_err());
    }

    #[test]
    fn odd_or_unpaired_utf16_is_an_error() {
        assert!(string(&[0x41], true, "x").is_err());
        assert!(string(&[0x00, 0xd8], true, "x").is_err());
        assert_eq!(string(&utf16le("Ünï"), true, "x"), Ok("Ünï".to_string()));
        assert_eq!(string(b"abc", false, "x"), Ok("abc".to_string()));
    }
}
