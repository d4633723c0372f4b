//! Image previews: choosing the terminal graphics protocol (`ui.images`), and decoding and
//! encoding images — both run on tokio's blocking pool, never on the UI thread.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use image::DynamicImage;
use ratatui::layout::Size;
use ratatui_image::picker::cap_parser::QueryStdioOptions;
use ratatui_image::picker::{Picker, ProtocolType};
use ratatui_image::protocol::Protocol;
use ratatui_image::Resize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImagesSetting {
    Auto,
    Kitty,
    Sixel,
    Iterm2,
    Halfblocks,
    Off,
}

impl std::str::FromStr for ImagesSetting {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Ok(match text {
            "auto" => ImagesSetting::Auto,
            "kitty" => ImagesSetting::Kitty,
            "sixel" => ImagesSetting::Sixel,
            "iterm2" => ImagesSetting::Iterm2,
            "halfblocks" => ImagesSetting::Halfblocks,
            "off" => ImagesSetting::Off,
            other => return Err(format!("ui.images: unknown value '{other}' (auto, kitty, sixel, iterm2, halfblocks, off)")),
        })
    }
}

/// Whether asking the terminal is unsafe or pointless: under tmux a query's answer can be
/// lost and swallow keystrokes; without a terminal nobody answers.
fn no_query() -> bool {
    std::env::var_os("TMUX").is_some_and(|v| !v.is_empty()) || !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal()
}

fn over_ssh() -> bool {
    ["SSH_CONNECTION", "SSH_TTY"].iter().any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
}

/// Asks the terminal for its graphics support and cell size; halfblocks on any failure.
fn query() -> Picker {
    let timeout = if over_ssh() { Duration::from_secs(5) } else { Duration::from_millis(1500) };
    let options = QueryStdioOptions { timeout, ..QueryStdioOptions::default() };
    match Picker::from_query_stdio_with_options(options) {
        Ok(picker) => picker,
        Err(error) => {
            tracing::info!("terminal graphics query failed ({error}); images use halfblocks");
            Picker::halfblocks()
        }
    }
}

/// The picker for `setting`, or None when previews are off. Call it in the alternate
/// screen, before the event stream starts reading the terminal.
pub fn picker(setting: ImagesSetting) -> Option<Picker> {
    let forced = match setting {
        ImagesSetting::Off => return None,
        ImagesSetting::Halfblocks => return Some(Picker::halfblocks()),
        ImagesSetting::Auto => None,
        ImagesSetting::Kitty => Some(ProtocolType::Kitty),
        ImagesSetting::Sixel => Some(ProtocolType::Sixel),
        ImagesSetting::Iterm2 => Some(ProtocolType::Iterm2),
    };
    let mut picker = if no_query() { Picker::halfblocks() } else { query() };
    if let Some(protocol) = forced {
        picker.set_protocol_type(protocol);
    }
    tracing::info!("image previews: {:?} (setting {setting:?})", picker.protocol_type());
    Some(picker)
}

pub fn protocol_name(picker: &Picker) -> String {
    format!("{:?}", picker.protocol_type()).to_lowercase()
}

/// Reads and decodes `path` for the preview; errors are one line for the image pane.
pub fn decode(path: &Path) -> Result<DynamicImage, String> {
    memlora::images::load(path).map_err(|e| e.to_string())
}

/// Scales `image` to fit `size` cells (keeping its proportions) and encodes it for the
/// terminal.
pub fn encode(picker: &Picker, image: DynamicImage, size: Size) -> Result<Protocol, String> {
    picker.new_protocol(image, size, Resize::Scale(None)).map_err(|e| format!("cannot encode the image: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_reports_missing_unsupported_and_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = decode(&dir.path().join("none.png")).unwrap_err();
        assert!(missing.contains("cannot read") && missing.contains("none.png"), "{missing}");
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, "just some text, not a picture").unwrap();
        let error = decode(&text).unwrap_err();
        assert!(error.contains("notes.txt: not an image in a supported format"), "{error}");
        // Named as a PNG, but is not one.
        let fake = dir.path().join("fake.png");
        std::fs::write(&fake, "just some text, not a picture").unwrap();
        let error = decode(&fake).unwrap_err();
        assert!(error.contains("fake.png: not an image"), "{error}");
        // A PNG cut off after its header.
        let png = dir.path().join("cut.png");
        let mut bytes = Vec::new();
        image::DynamicImage::new_rgb8(64, 64).write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
        std::fs::write(&png, &bytes[..40]).unwrap();
        assert!(decode(&png).is_err());
        // A whole one decodes, and encodes for halfblocks into the cells asked for.
        std::fs::write(&png, &bytes).unwrap();
        let image = decode(&png).unwrap();
        assert_eq!((image.width(), image.height()), (64, 64));
        let protocol = encode(&Picker::halfblocks(), image, Size::new(10, 5)).unwrap();
        let size = protocol.size();
        assert!(size.width <= 10 && size.height <= 5 && size.width > 0, "{size:?}");
        assert_eq!("off".parse::<ImagesSetting>(), Ok(ImagesSetting::Off));
        assert!("svg".parse::<ImagesSetting>().unwrap_err().contains("ui.images"));
    }
}
