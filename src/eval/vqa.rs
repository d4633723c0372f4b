//! Visual question answering with one-word answers, scored as MemLoRA-V's V score: exact
//! match after lower-casing and trimming. A set is a directory with `questions.jsonl`
//! (`{"image": "FILE", "question": "…", "answer": "…", "kind": "…"}` per line) and the
//! images it names. [`generate_set`] draws the shipped set (assets/vqa/) in code —
//! counting shapes, the colour of an object, the one odd object among many — so that it
//! can be rebuilt exactly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::EvalError;

pub const QUESTIONS_FILE: &str = "questions.jsonl";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VqaItem {
    /// Relative to the set's directory.
    pub image: PathBuf,
    pub question: String,
    pub answer: String,
    /// counting, colour, odd-one-out, …
    pub kind: String,
}

/// Reads `dir/questions.jsonl`, checking that every image it names exists.
pub fn read_set(dir: &Path) -> Result<Vec<VqaItem>, EvalError> {
    let path = dir.join(QUESTIONS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| EvalError::Data { path: path.clone(), message: e.to_string() })?;
    let mut items = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| EvalError::Data { path: path.clone(), message: format!("line {}: {message}", index + 1) };
        let item: VqaItem = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        if !dir.join(&item.image).is_file() {
            return Err(bad(format!("no image {}", item.image.display())));
        }
        items.push(item);
    }
    if items.is_empty() {
        return Err(EvalError::Data { path, message: "no questions".into() });
    }
    Ok(items)
}

/// The one word a prediction is compared on: lower-case, trimmed, without the
/// punctuation small models end sentences with.
pub fn normalise(text: &str) -> String {
    text.trim().trim_matches(|c: char| c.is_ascii_punctuation() || c.is_whitespace()).to_lowercase()
}

/// Exact match after [`normalise`].
pub fn correct(prediction: &str, answer: &str) -> bool {
    normalise(prediction) == normalise(answer)
}

/// Accuracy (0–100) per kind and overall.
pub fn accuracy(results: &[(String, bool)]) -> (BTreeMap<String, f64>, f64) {
    let mut by_kind: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (kind, right) in results {
        let entry = by_kind.entry(kind.clone()).or_default();
        entry.0 += usize::from(*right);
        entry.1 += 1;
    }
    let percent = |(right, all): (usize, usize)| if all == 0 { 0.0 } else { 100.0 * right as f64 / all as f64 };
    let overall = percent((results.iter().filter(|(_, r)| *r).count(), results.len()));
    (by_kind.into_iter().map(|(kind, counts)| (kind, percent(counts))).collect(), overall)
}

// ---------------------------------------------------------------------------
// The generated set
// ---------------------------------------------------------------------------

const SIDE: u32 = 384;
const WHITE: [u8; 3] = [255, 255, 255];
const COLOURS: [(&str, [u8; 3]); 5] =
    [("red", [220, 30, 30]), ("blue", [30, 60, 220]), ("green", [30, 170, 50]), ("yellow", [240, 210, 20]), ("black", [20, 20, 20])];
const NUMBERS: [&str; 7] = ["zero", "one", "two", "three", "four", "five", "six"];

#[derive(Clone, Copy, PartialEq)]
enum Shape {
    Circle,
    Square,
    Triangle,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }
}

/// Draws `shape` of half-size `r` centred at (cx, cy).
fn draw(image: &mut RgbImage, shape: Shape, (cx, cy): (i32, i32), r: i32, colour: [u8; 3]) {
    for y in (cy - r).max(0)..(cy + r).min(SIDE as i32) {
        for x in (cx - r).max(0)..(cx + r).min(SIDE as i32) {
            let (dx, dy) = ((x - cx) as f32, (y - cy) as f32);
            let inside = match shape {
                Shape::Circle => dx * dx + dy * dy <= (r * r) as f32,
                Shape::Square => true,
                // Apex up: the half-width grows from 0 at the top to r at the bottom.
                Shape::Triangle => dx.abs() <= (dy + r as f32) / 2.0,
            };
            if inside {
                image.put_pixel(x as u32, y as u32, Rgb(colour));
            }
        }
    }
}

/// `count` centres at least `gap` apart, inside the margins.
fn places(rng: &mut impl Rng, count: usize, r: i32, gap: i32) -> Vec<(i32, i32)> {
    let mut centres: Vec<(i32, i32)> = Vec::new();
    while centres.len() < count {
        let c = (rng.random_range(r + 8..SIDE as i32 - r - 8), rng.random_range(r + 8..SIDE as i32 - r - 8));
        if centres.iter().all(|(x, y)| (x - c.0).pow(2) + (y - c.1).pow(2) >= gap * gap) {
            centres.push(c);
        }
    }
    centres
}

/// Draws the VQA set into `dir` (PNG images and `questions.jsonl`); the same seed gives
/// the same files.
pub fn generate_set(dir: &Path, seed: u64) -> Result<Vec<VqaItem>, EvalError> {
    std::fs::create_dir_all(dir).map_err(|e| EvalError::Data { path: dir.to_owned(), message: e.to_string() })?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let shapes = [Shape::Circle, Shape::Square, Shape::Triangle];
    let mut items = Vec::new();
    let mut save = |name: String, image: RgbImage, question: &str, answer: &str, kind: &str| -> Result<(), EvalError> {
        let path = dir.join(&name);
        image.save_with_format(&path, image::ImageFormat::Png).map_err(|e| EvalError::Data { path, message: e.to_string() })?;
        items.push(VqaItem { image: name.into(), question: question.into(), answer: answer.into(), kind: kind.into() });
        Ok(())
    };
    for i in 0..8 {
        let count = 1 + (i % 6);
        let shape = shapes[i % 3];
        let colour = COLOURS[i % 4].1;
        let mut image = RgbImage::from_pixel(SIDE, SIDE, Rgb(WHITE));
        for centre in places(&mut rng, count, 28, 70) {
            draw(&mut image, shape, centre, 28, colour);
        }
        let question = format!("How many {}s are in the picture? Answer with one word.", shape.name());
        save(format!("count-{i}.png"), image, &question, NUMBERS[count], "counting")?;
    }
    for i in 0..8 {
        let (colour_name, colour) = COLOURS[i % COLOURS.len()];
        let shape = shapes[i % 3];
        let mut image = RgbImage::from_pixel(SIDE, SIDE, Rgb(WHITE));
        draw(&mut image, shape, (rng.random_range(110..274), rng.random_range(110..274)), 90, colour);
        let question = format!("What colour is the {}? Answer with one word.", shape.name());
        save(format!("colour-{i}.png"), image, &question, colour_name, "colour")?;
    }
    for i in 0..8 {
        let common = shapes[i % 3];
        let odd = shapes[(i + 1 + i / 3) % 3];
        let colour = COLOURS[(i + 1) % 4].1;
        let mut image = RgbImage::from_pixel(SIDE, SIDE, Rgb(WHITE));
        let centres = places(&mut rng, 6, 26, 68);
        for (k, centre) in centres.into_iter().enumerate() {
            draw(&mut image, if k == 0 { odd } else { common }, centre, 26, colour);
        }
        let question = format!("All shapes but one are {}s. What shape is the odd one? Answer with one word.", common.name());
        save(format!("odd-{i}.png"), image, &question, odd.name(), "odd-one-out")?;
    }
    let lines: Vec<String> = items.iter().map(|item| serde_json::to_string(item).expect("plain data")).collect();
    let path = dir.join(QUESTIONS_FILE);
    std::fs::write(&path, lines.join("\n") + "\n").map_err(|e| EvalError::Data { path, message: e.to_string() })?;
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_match_after_lowercasing_and_trimming_only() {
        assert!(correct(" Three.\n", "three"));
        assert!(correct("RED", "red"));
        assert!(!correct("three circles", "three"));
        assert!(!correct("3", "three"));
        let (by_kind, overall) = accuracy(&[("colour".into(), true), ("colour".into(), false), ("counting".into(), true)]);
        assert_eq!((by_kind["colour"], by_kind["counting"]), (50.0, 100.0));
        assert!((overall - 200.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn the_shipped_set_is_what_the_generator_draws() {
        let dir = tempfile::tempdir().unwrap();
        let items = generate_set(dir.path(), 7).unwrap();
        assert_eq!(items.len(), 24);
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/vqa");
        assert_eq!(read_set(&shipped).unwrap(), items, "assets/vqa is generate_set(7)");
        for item in &items {
            let drawn = std::fs::read(dir.path().join(&item.image)).unwrap();
            assert_eq!(std::fs::read(shipped.join(&item.image)).unwrap(), drawn, "{}", item.image.display());
        }
        // Counting images hold as many separate shapes as the answer says.
        let count = &items[2];
        let image = image::open(dir.path().join(&count.image)).unwrap().to_rgb8();
        let mut seen = vec![false; (SIDE * SIDE) as usize];
        let mut blobs = 0;
        for start in 0..seen.len() {
            if seen[start] || image.as_raw()[start * 3..start * 3 + 3] == WHITE {
                continue;
            }
            blobs += 1;
            let mut stack = vec![start];
            while let Some(p) = stack.pop() {
                if seen[p] || image.as_raw()[p * 3..p * 3 + 3] == WHITE {
                    continue;
                }
                seen[p] = true;
                let (x, y) = (p as u32 % SIDE, p as u32 / SIDE);
                if x > 0 {
                    stack.push(p - 1);
                }
                if x + 1 < SIDE {
                    stack.push(p + 1);
                }
                if y > 0 {
                    stack.push(p - SIDE as usize);
                }
                if y + 1 < SIDE {
                    stack.push(p + SIDE as usize);
                }
            }
        }
        assert_eq!(NUMBERS[blobs], count.answer);
    }

    #[test]
    fn a_broken_set_is_refused_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(QUESTIONS_FILE),
            "{\"image\": \"a.png\", \"question\": \"q\", \"answer\": \"a\", \"kind\": \"k\"}\n",
        )
        .unwrap();
        let error = read_set(dir.path()).unwrap_err().to_string();
        assert!(error.contains("line 1: no image a.png"), "{error}");
        std::fs::write(dir.path().join(QUESTIONS_FILE), "not json\n").unwrap();
        assert!(read_set(dir.path()).unwrap_err().to_string().contains("line 1"));
    }
}
