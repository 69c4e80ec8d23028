//! The live view's keys, read from stdin by hand, and the end of its terminal.
//!
//! crossterm's reader is not used: once the terminal is gone (the ssh session dropped, the
//! tmux session killed) every read returns 0 bytes or EIO, and crossterm retries that read
//! forever inside `poll`, so `top` spun a core and never came back to see the signal that
//! should end it. Here a read of nothing, EIO or a hangup means the terminal is gone, and
//! the view ends.
//!
//! Raw mode (VMIN 1, VTIME 0) means a read after a readable poll returns at once with what
//! was typed; stdin is left blocking, since the shell gets it back afterwards.

use std::io;
use std::time::Duration;

use super::app::Key;

/// What the terminal had for the view within one wait.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    /// Keys typed (none when the wait passed quietly).
    Keys(Vec<Key>),
    /// The terminal hung up or reached its end: nobody is left to look at the view.
    Gone,
}

/// Waits at most `timeout` for keys on stdin.
pub fn wait(timeout: Duration) -> io::Result<Input> {
    let revents = match poll_stdin(timeout) {
        Ok(r) => r,
        // A signal (the ones that end the view among them): the caller looks at once.
        Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(Input::Keys(Vec::new())),
        Err(e) => return Err(e),
    };
    if revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
        return Ok(Input::Gone);
    }
    if revents & libc::POLLIN == 0 {
        return Ok(Input::Keys(Vec::new()));
    }
    let mut buf = [0u8; 1024];
    match read_stdin(&mut buf) {
        Ok(0) => Ok(Input::Gone),
        Ok(n) => Ok(Input::Keys(keys(&buf[..n]))),
        Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(Input::Gone),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
            ) =>
        {
            Ok(Input::Keys(Vec::new()))
        }
        Err(e) => Err(e),
    }
}

#[allow(unsafe_code)]
fn poll_stdin(timeout: Duration) -> io::Result<libc::c_short> {
    let mut fd = libc::pollfd {
        fd: libc::STDIN_FILENO,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: poll reads and writes one pollfd, a live local, for the duration of the call.
    let n = unsafe { libc::poll(&mut fd, 1, ms) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(if n == 0 { 0 } else { fd.revents })
}

#[allow(unsafe_code)]
fn read_stdin(buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: read writes at most buf.len() bytes into a live buffer we borrow mutably;
    // stdin stays open for the whole process.
    let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// The keys in what a raw-mode terminal sent. Escape sequences the view has no use for
/// (arrows, function keys, Alt-combinations, terminal reports) are skipped whole, so their
/// letters are never taken for keys; an escape alone is Esc.
pub fn keys(bytes: &[u8]) -> Vec<Key> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        i += 1;
        match b {
            0x03 => out.push(Key::Interrupt),
            b'\t' => out.push(Key::Tab),
            0x1b => match bytes.get(i) {
                None | Some(0x1b) => out.push(Key::Esc),
                Some(b'[') => {
                    // CSI: parameter and intermediate bytes, then one final byte.
                    let rest = &bytes[i + 1..];
                    let end = rest.iter().position(|c| (0x40..=0x7e).contains(c));
                    if end == Some(0) && rest[0] == b'Z' {
                        out.push(Key::BackTab);
                    }
                    i += 1 + end.map_or(rest.len(), |e| e + 1);
                }
                // SS3 (F1-F4, arrows in application mode) and Alt-key: two bytes.
                Some(b'O') => i = (i + 2).min(bytes.len()),
                Some(_) => i += 1,
            },
            _ if b < 0x20 || b == 0x7f => {}
            _ => {
                let len = match b {
                    0xc0..=0xdf => 2,
                    0xe0..=0xef => 3,
                    0xf0..=0xf7 => 4,
                    _ => 1,
                };
                let end = (i - 1 + len).min(bytes.len());
                if let Some(c) = std::str::from_utf8(&bytes[i - 1..end])
                    .ok()
                    .and_then(|s| s.chars().next())
                {
                    out.push(Key::Char(c));
                }
                i = end;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_read_from_raw_bytes_and_sequences_are_skipped_whole() {
        assert_eq!(
            keys(b"qs\tL\x03"),
            [
                Key::Char('q'),
                Key::Char('s'),
                Key::Tab,
                Key::Char('L'),
                Key::Interrupt
            ]
        );
        assert_eq!(keys(b"\x1b"), [Key::Esc]);
        assert_eq!(keys(b"\x1b[Z"), [Key::BackTab]);
        // Up arrow, F1 (SS3), F5, a cursor report, Alt-q: none is a key, nor are their letters.
        assert_eq!(keys(b"\x1b[A\x1bOP\x1b[15~\x1b[12;40R\x1bq"), []);
        assert_eq!(keys(b"\x1b\x1b[Bs"), [Key::Esc, Key::Char('s')]);
        assert_eq!(keys("é!".as_bytes()), [Key::Char('é'), Key::Char('!')]);
        // Enter, backspace, a cut-off sequence and a broken UTF-8 byte: nothing, no panic.
        assert_eq!(keys(b"\r\x7f\x1b[1"), []);
        assert_eq!(keys(b"\xc3"), []);
    }
}
