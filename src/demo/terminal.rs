//! The terminal of the live view: alternate screen and raw mode for single
//! key presses, always restored (on drop, and before a panic message prints).

use crossterm::event::{self, Event as TermEvent, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use crossterm::{cursor, execute, terminal};
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// How often the key reader looks whether it should stop.
const KEY_POLL: Duration = Duration::from_millis(100);

/// A key press the demo acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    /// `k`: kill -9 the leader.
    Kill,
    /// `p` (or `f`): freeze the leader with SIGSTOP.
    Freeze,
    /// `t`: SIGTERM the leader (graceful handoff).
    Handoff,
    /// `q`, Esc or Ctrl-C.
    Quit,
}

/// Maps a terminal key event to a demo key.
pub fn key_of(event: &KeyEvent) -> Option<Key> {
    if event.kind == KeyEventKind::Release {
        return None;
    }
    let ctrl = event.modifiers.contains(KeyModifiers::CONTROL);
    match event.code {
        KeyCode::Char('c') if ctrl => Some(Key::Quit),
        _ if ctrl => None,
        KeyCode::Char('k' | 'K') => Some(Key::Kill),
        KeyCode::Char('p' | 'P' | 'f' | 'F') => Some(Key::Freeze),
        KeyCode::Char('t' | 'T') => Some(Key::Handoff),
        KeyCode::Char('q' | 'Q') | KeyCode::Esc => Some(Key::Quit),
        _ => None,
    }
}

/// The terminal in live-view mode; dropping it gives the terminal back.
pub struct Screen {
    stop_keys: Arc<AtomicBool>,
    keys: Option<std::thread::JoinHandle<()>>,
}

impl Screen {
    /// Switches to the alternate screen in raw mode and starts reading keys
    /// into `keys`.
    pub fn enter(keys: mpsc::Sender<Key>) -> io::Result<Screen> {
        let previous = Arc::new(std::panic::take_hook());
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
        terminal::enable_raw_mode()?;
        let mut screen = Screen {
            stop_keys: Arc::new(AtomicBool::new(false)),
            keys: None,
        };
        execute!(io::stdout(), terminal::EnterAlternateScreen, cursor::Hide)?;
        let stop = Arc::clone(&screen.stop_keys);
        screen.keys = Some(
            std::thread::Builder::new()
                .name("demo-keys".into())
                .spawn(move || read_keys(&keys, &stop))?,
        );
        Ok(screen)
    }

    /// Returns the terminal size in columns and rows.
    pub fn size() -> (u16, u16) {
        terminal::size().unwrap_or((100, 30))
    }

    /// Draws `lines` over the previous frame.
    pub fn draw(&mut self, lines: &[String]) -> io::Result<()> {
        let mut frame = String::from("\x1b[H");
        for (i, line) in lines.iter().enumerate() {
            if i > 0 {
                frame.push_str("\r\n");
            }
            frame.push_str(line);
            frame.push_str("\x1b[K");
        }
        frame.push_str("\x1b[J");
        let mut out = io::stdout().lock();
        out.write_all(frame.as_bytes())?;
        out.flush()
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        self.stop_keys.store(true, Ordering::Relaxed);
        if let Some(keys) = self.keys.take() {
            let _ = keys.join();
        }
        restore();
        // The hook set in `enter` stays: restoring twice is harmless.
    }
}

/// Leaves raw mode and the alternate screen, best effort.
fn restore() {
    let _ = execute!(io::stdout(), cursor::Show, terminal::LeaveAlternateScreen);
    let _ = terminal::disable_raw_mode();
}

/// Forwards key presses until `stop` is set or nobody listens.
fn read_keys(keys: &mpsc::Sender<Key>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match event::poll(KEY_POLL) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(_) => return,
        }
        let Ok(TermEvent::Key(key)) = event::read() else {
            continue;
        };
        if let Some(key) = key_of(&key) {
            if keys.blocking_send(key).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn press(code: KeyCode, modifiers: KeyModifiers) -> Option<Key> {
        key_of(&KeyEvent::new(code, modifiers))
    }

    #[test]
    fn keys_map_to_faults_and_quit() {
        assert_eq!(
            press(KeyCode::Char('k'), KeyModifiers::NONE),
            Some(Key::Kill)
        );
        assert_eq!(
            press(KeyCode::Char('p'), KeyModifiers::NONE),
            Some(Key::Freeze)
        );
        assert_eq!(
            press(KeyCode::Char('t'), KeyModifiers::NONE),
            Some(Key::Handoff)
        );
        assert_eq!(
            press(KeyCode::Char('q'), KeyModifiers::NONE),
            Some(Key::Quit)
        );
        assert_eq!(press(KeyCode::Esc, KeyModifiers::NONE), Some(Key::Quit));
        assert_eq!(
            press(KeyCode::Char('c'), KeyModifiers::CONTROL),
            Some(Key::Quit)
        );
        assert_eq!(press(KeyCode::Char('k'), KeyModifiers::CONTROL), None);
        assert_eq!(press(KeyCode::Char('x'), KeyModifiers::NONE), None);
    }
}
