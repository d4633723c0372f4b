//! Image files: decoding what a user attaches (PNG, JPEG, WebP, GIF's first frame, BMP),
//! upright by its EXIF orientation and never larger than [`MAX_SIDE`], and keeping a copy
//! in the data dir so that a memory can show the model the same image weeks later.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageDecoder, ImageFormat};
use sha2::{Digest, Sha256};

/// Largest side kept after decoding: the models look at 512 × 512 and a preview never needs
/// more, so a 50-megapixel photo costs no more than this.
pub const MAX_SIDE: u32 = 2048;
/// Most bytes a decoded image may take: a header is checked against this before
/// anything is allocated, so a 1 KB file that claims 100000 × 100000 pixels is refused
/// instead of asking for 30 GB.
const MAX_DECODE_BYTES: u64 = 256 << 20;
/// Largest side a file may declare (a 16384-pixel panorama still decodes).
const MAX_DECODE_SIDE: u32 = 16_384;
/// Largest image file read (the whole file is read before decoding).
const MAX_FILE_BYTES: u64 = 64 << 20;
/// Where copies live, inside the data dir.
pub const IMAGES_DIR: &str = "images";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {message}")]
    Unreadable { path: PathBuf, message: String },
    #[error("{path}: not an image in a supported format (png, jpeg, gif, webp, bmp)")]
    Unsupported { path: PathBuf },
    #[error("{path}: the image is {what}; memlora reads at most {limit}")]
    TooLarge { path: PathBuf, what: String, limit: &'static str },
    #[error("{path}: cannot store a copy: {message}")]
    Store { path: PathBuf, message: String },
}

/// Reads and decodes `path` (the format from its content, not its name), turned upright,
/// shrunk to at most [`MAX_SIDE`] pixels a side.
pub fn load(path: &Path) -> Result<DynamicImage, ImageError> {
    // Decoders' messages can run over several lines; the first says what is wrong.
    let unreadable =
        |message: String| ImageError::Unreadable { path: path.to_owned(), message: message.lines().next().unwrap_or_default().trim_end().to_owned() };
    let size = fs::metadata(path).map_err(|e| unreadable(format!("cannot read: {e}")))?.len();
    if size > MAX_FILE_BYTES {
        return Err(ImageError::TooLarge { path: path.to_owned(), what: format!("{} MB on disk", size >> 20), limit: "64 MB" });
    }
    let bytes = fs::read(path).map_err(|e| unreadable(format!("cannot read: {e}")))?;
    if bytes.is_empty() {
        return Err(unreadable("the file is empty".into()));
    }
    let mut reader =
        image::ImageReader::new(std::io::Cursor::new(&bytes)).with_guessed_format().map_err(|e| unreadable(format!("cannot read: {e}")))?;
    if !reader.format().is_some_and(supported) {
        return Err(ImageError::Unsupported { path: path.to_owned() });
    }
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| match e {
        image::ImageError::Limits(_) => too_large(path, None),
        other => unreadable(other.to_string()),
    })?;
    // Decoders do not check the buffer they are about to fill against `max_alloc`.
    let (width, height) = decoder.dimensions();
    if width > MAX_DECODE_SIDE || height > MAX_DECODE_SIDE || decoder.total_bytes() > MAX_DECODE_BYTES {
        return Err(too_large(path, Some((width, height, decoder.total_bytes()))));
    }
    // Phones store photos sideways and say so in EXIF; people expect them upright.
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| unreadable(e.to_string()))?;
    image.apply_orientation(orientation);
    if image.width() == 0 || image.height() == 0 {
        return Err(unreadable("the image has no pixels".into()));
    }
    Ok(if image.width() > MAX_SIDE || image.height() > MAX_SIDE { image.thumbnail(MAX_SIDE, MAX_SIDE) } else { image })
}

/// The refusal of an image whose header asks for more than memlora decodes.
fn too_large(path: &Path, declared: Option<(u32, u32, u64)>) -> ImageError {
    let what = match declared {
        Some((width, height, bytes)) => format!("{width} × {height} pixels ({} MB decoded)", bytes >> 20),
        None => "too large to decode".to_owned(),
    };
    ImageError::TooLarge { path: path.to_owned(), what, limit: "16384 pixels a side and 256 MB decoded" }
}

fn supported(format: ImageFormat) -> bool {
    matches!(format, ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::Gif | ImageFormat::WebP | ImageFormat::Bmp)
}

/// An image file copied into the data dir.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredImage {
    /// `DATA_DIR/images/SHA256.EXT`
    pub path: PathBuf,
    pub sha256: String,
}

/// Checks that `source` decodes, then copies it into `data_dir/images/` under its content
/// hash (private, written whole or not at all; a second copy of the same image is the
/// same file).
pub fn store(data_dir: &Path, source: &Path) -> Result<(StoredImage, DynamicImage), ImageError> {
    let image = load(source)?;
    let failed = |message: String| ImageError::Store { path: source.to_owned(), message };
    let bytes = fs::read(source).map_err(|e| failed(e.to_string()))?;
    let sha256: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    let extension = image::guess_format(&bytes).ok().and_then(|f| f.extensions_str().first().copied()).unwrap_or("img");
    let dir = data_dir.join(IMAGES_DIR);
    fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(|e| failed(e.to_string()))?;
    let path = dir.join(format!("{sha256}.{extension}"));
    if !path.is_file() {
        let staging = dir.join(format!(".{sha256}.part"));
        let mut file =
            fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&staging).map_err(|e| failed(e.to_string()))?;
        file.write_all(&bytes).and_then(|()| file.sync_all()).map_err(|e| failed(e.to_string()))?;
        fs::rename(&staging, &path).map_err(|e| failed(e.to_string()))?;
    }
    Ok((StoredImage { path, sha256 }, image))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage};

    fn encoded(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut bytes = Vec::new();
        image.write_to(&mut std::io::Cursor::new(&mut bytes), format).unwrap();
        bytes
    }

    #[test]
    fn every_supported_format_decodes_and_big_images_are_shrunk() {
        let dir = tempfile::tempdir().unwrap();
        let picture = DynamicImage::ImageRgb8(RgbImage::from_pixel(64, 48, Rgb([10, 200, 30])));
        for (format, name) in [
            (ImageFormat::Png, "a.png"),
            (ImageFormat::Jpeg, "a.jpg"),
            (ImageFormat::Gif, "a.gif"),
            (ImageFormat::WebP, "a.webp"),
            (ImageFormat::Bmp, "a.bmp"),
        ] {
            let path = dir.path().join(name);
            fs::write(&path, encoded(&picture, format)).unwrap();
            let image = load(&path).unwrap();
            assert_eq!((image.width(), image.height()), (64, 48), "{name}");
        }
        let huge = dir.path().join("huge.png");
        fs::write(&huge, encoded(&DynamicImage::new_rgb8(5000, 100), ImageFormat::Png)).unwrap();
        let image = load(&huge).unwrap();
        assert_eq!(image.width(), MAX_SIDE);
    }

    #[test]
    fn bad_files_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = load(&dir.path().join("none.png")).unwrap_err().to_string();
        assert!(missing.contains("none.png") && missing.contains("cannot read"), "{missing}");
        let empty = dir.path().join("empty.png");
        fs::write(&empty, b"").unwrap();
        assert!(load(&empty).unwrap_err().to_string().contains("empty.png: the file is empty"));
        let text = dir.path().join("notes.txt");
        fs::write(&text, "just some text, not a picture").unwrap();
        assert!(load(&text).unwrap_err().to_string().contains("notes.txt: not an image in a supported format"));
        let fake = dir.path().join("fake.png");
        fs::write(&fake, "just some text").unwrap();
        assert!(matches!(load(&fake), Err(ImageError::Unsupported { .. })));
        let bytes = encoded(&DynamicImage::new_rgb8(64, 64), ImageFormat::Png);
        let cut = dir.path().join("cut.png");
        fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let error = load(&cut).unwrap_err().to_string();
        assert!(error.starts_with(&format!("{}:", cut.display())) && error.lines().count() == 1, "{error}");
        // A TIFF is an image, but not one memlora reads.
        let tiff = dir.path().join("a.tiff");
        fs::write(&tiff, b"II*\0\x08\0\0\0").unwrap();
        assert!(matches!(load(&tiff), Err(ImageError::Unsupported { .. })));
        // Nothing was stored for any of them.
        assert!(store(dir.path(), &cut).is_err());
        assert!(!dir.path().join(IMAGES_DIR).exists());
    }

    /// A PNG of a few bytes whose header declares `width` × `height` RGB pixels.
    fn png_declaring(width: u32, height: u32) -> Vec<u8> {
        fn chunk(kind: &[u8], data: &[u8]) -> Vec<u8> {
            let mut crc = crc32(kind, 0xffff_ffff);
            crc = crc32(data, crc) ^ 0xffff_ffff;
            [&(data.len() as u32).to_be_bytes()[..], kind, data, &crc.to_be_bytes()].concat()
        }
        fn crc32(bytes: &[u8], mut crc: u32) -> u32 {
            for &b in bytes {
                crc ^= u32::from(b);
                for _ in 0..8 {
                    crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
                }
            }
            crc
        }
        let header = [&width.to_be_bytes()[..], &height.to_be_bytes(), &[8, 2, 0, 0, 0]].concat();
        // A stored (uncompressed) zlib stream of one empty row: far too little data.
        let idat = [0x78, 0x01, 0x01, 0x01, 0x00, 0xfe, 0xff, 0x00, 0x00, 0x01, 0x00, 0x01];
        [&b"\x89PNG\r\n\x1a\n"[..], &chunk(b"IHDR", &header), &chunk(b"IDAT", &idat), &chunk(b"IEND", &[])].concat()
    }

    #[test]
    fn images_declaring_absurd_sizes_are_refused_before_decoding() {
        let dir = tempfile::tempdir().unwrap();
        for (width, height, says) in
            [(100_000, 100_000, "100000 × 100000 pixels"), (16_000, 16_000, "16000 × 16000 pixels"), (1, 2_000_000_000, "1 × 2000000000 pixels")]
        {
            let path = dir.path().join(format!("{width}x{height}.png"));
            fs::write(&path, png_declaring(width, height)).unwrap();
            let error = load(&path).unwrap_err();
            let message = error.to_string();
            assert!(matches!(error, ImageError::TooLarge { .. }), "{message}");
            assert!(message.starts_with(&format!("{}: the image is ", path.display())) && message.contains(says), "{message}");
            assert!(store(dir.path(), &path).is_err());
        }
        // A real image under the limits still decodes after the refusals.
        let small = dir.path().join("small.png");
        fs::write(&small, encoded(&DynamicImage::new_rgb8(3, 2), ImageFormat::Png)).unwrap();
        assert_eq!(load(&small).unwrap().width(), 3);
        assert!(!dir.path().join(IMAGES_DIR).exists());
    }

    #[test]
    fn exif_orientation_turns_a_photo_upright() {
        // A 4×2 JPEG whose EXIF says "rotate 90° clockwise to display".
        let dir = tempfile::tempdir().unwrap();
        let jpeg = encoded(&DynamicImage::ImageRgb8(RgbImage::from_pixel(4, 2, Rgb([90, 90, 90]))), ImageFormat::Jpeg);
        let exif: Vec<u8> = [
            b"Exif\0\0".as_slice(),
            b"MM\0\x2a\0\0\0\x08",                       // big-endian TIFF header, IFD at 8
            &[0, 1],                                     // one entry
            &[0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0], // Orientation (SHORT) = 6
            &[0, 0, 0, 0],                               // no next IFD
        ]
        .concat();
        let mut app1 = vec![0xff, 0xe1];
        app1.extend_from_slice(&((exif.len() + 2) as u16).to_be_bytes());
        app1.extend_from_slice(&exif);
        let with_exif: Vec<u8> = [&jpeg[..2], &app1, &jpeg[2..]].concat();
        let path = dir.path().join("sideways.jpg");
        fs::write(&path, with_exif).unwrap();
        let image = load(&path).unwrap();
        assert_eq!((image.width(), image.height()), (2, 4));
    }

    #[test]
    fn stored_copies_are_private_and_named_by_content() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("cat.png");
        fs::write(&source, encoded(&DynamicImage::new_rgb8(8, 8), ImageFormat::Png)).unwrap();
        let (stored, image) = store(&dir.path().join("data"), &source).unwrap();
        assert_eq!((image.width(), stored.sha256.len()), (8, 64));
        assert_eq!(stored.path, dir.path().join("data/images").join(format!("{}.png", stored.sha256)));
        assert_eq!(fs::read(&stored.path).unwrap(), fs::read(&source).unwrap());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&stored.path).unwrap().permissions().mode() & 0o777, 0o600);
        let (again, _) = store(&dir.path().join("data"), &source).unwrap();
        assert_eq!(again, stored);
    }
}
