//! `memlora serve` end to end with tiny random models: clients on the socket share one
//! worker and see each other's memory changes pushed to them; a client killed mid-answer,
//! garbage and oversized lines leave the daemon serving the others; a second daemon and a
//! stale socket; the commands find the daemon by themselves.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::quantized::GgmlDType;
use common::{assert_one_line_error, json_of, memlora_command, stderr, TinyModel, TinySpec};
use memlora::engine::Embedder;
use memlora::memory::MemoryStore;
use serde_json::{json, Value};

/// A daemon on a data dir with a tiny model, killed when dropped.
struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Daemon {
    /// A daemon with a tiny model answering up to `max_tokens` tokens.
    fn start(dir: &Path, max_tokens: usize) -> Daemon {
        let model = tiny_model(dir);
        let mut command = memlora_command(dir);
        command.args(["serve", "--model", model.to_str().unwrap()]).env("MEMLORA_GENERATION__MAX_TOKENS", max_tokens.to_string());
        Daemon::spawn(dir, command)
    }

    /// A daemon with a tiny model (4-token answers) and a tiny vision model.
    fn start_with_vision(dir: &Path) -> Daemon {
        let vision_model = common::write_tiny_smolvlm(&dir.join("tiny-vlm"), 4);
        let model = tiny_model(dir);
        let mut command = memlora_command(dir);
        command
            .args(["serve", "--model", model.to_str().unwrap()])
            .env("MEMLORA_GENERATION__MAX_TOKENS", "4")
            .env("MEMLORA_VISION__MODEL", &vision_model);
        Daemon::spawn(dir, command)
    }

    /// Starts `command` (a `serve`) and waits until it answers.
    fn spawn(dir: &Path, mut command: Command) -> Daemon {
        let child = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let mut daemon = Daemon { child, dir: dir.to_owned() };
        // Ready when it answers a request (it accepts once the models are loaded).
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(mut client) = Client::try_connect(dir) {
                client.send(json!({"id": "ready", "type": "status"}));
                if client.response("ready")["ok"] == true {
                    return daemon;
                }
            }
            if let Some(status) = daemon.child.try_wait().unwrap() {
                let mut err = String::new();
                daemon.child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                panic!("the daemon exited ({status}): {err}");
            }
            assert!(Instant::now() < deadline, "the daemon did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `serve --stop`, then the daemon must have exited cleanly.
    fn stop(mut self) {
        let out = memlora_command(&self.dir).args(["serve", "--stop"]).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the daemon exited with {status}");
        assert!(!self.dir.join("memlora.sock").exists(), "the socket is removed");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tiny_model(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.gguf");
    if !path.exists() {
        TinyModel::random(TinySpec::llama(), 41).write_gguf(&path, GgmlDType::Q8_0);
    }
    path
}

/// A raw protocol client on the socket.
struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Lines read while waiting for something else.
    seen: Vec<Value>,
}

impl Client {
    fn try_connect(dir: &Path) -> std::io::Result<Client> {
        let stream = UnixStream::connect(dir.join("memlora.sock"))?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(Client { reader: BufReader::new(stream.try_clone()?), writer: stream, seen: Vec::new() })
    }

    fn connect(dir: &Path) -> Client {
        Client::try_connect(dir).unwrap()
    }

    fn send(&mut self, line: Value) {
        self.send_raw(format!("{line}\n").as_bytes());
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    /// The next line, or None at the end of the connection.
    fn line(&mut self) -> Option<Value> {
        let mut text = String::new();
        match self.reader.read_line(&mut text) {
            Ok(0) => None,
            Ok(_) => Some(serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))),
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(error) => panic!("reading from the daemon: {error}"),
        }
    }

    /// Reads until a line with `"ok"` for request `id`, keeping the others in `seen`.
    fn response(&mut self, id: &str) -> Value {
        loop {
            let line = self.line().expect("the daemon closed the connection");
            if line["id"] == id && line.get("ok").is_some() {
                return line;
            }
            self.seen.push(line);
        }
    }

    /// Reads until a pushed memory notice.
    fn notice(&mut self) -> Value {
        if let Some(at) = self.seen.iter().position(|l| l["event"] == "memory_notice") {
            return self.seen.remove(at);
        }
        loop {
            let line = self.line().expect("the daemon closed the connection");
            if line["event"] == "memory_notice" {
                return line;
            }
            self.seen.push(line);
        }
    }
}

/// The store of `dir` (no daemon may hold it) is consistent with its log.
fn assert_store_verifies(dir: &Path) {
    let embedder = Embedder::load(&dir.join("tiny-bert")).unwrap();
    let store = MemoryStore::open(dir, embedder.dimension()).unwrap();
    store.verify().unwrap();
}

#[test]
fn two_clients_share_memories_and_each_sees_the_others_changes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let daemon = Daemon::start(d, 8);

    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.join("memlora.sock")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the socket is the user's only");

    let mut a = Client::connect(d);
    let mut b = Client::connect(d);
    // b is connected (its status answered) before a changes memory.
    b.send(json!({"id": "s", "type": "status"}));
    assert_eq!(b.response("s")["status"]["model"].as_str().unwrap(), tiny_model(d).to_str().unwrap());

    a.send(json!({"id": "1", "type": "remember", "text": "the cat sat on the mat"}));
    let response = a.response("1");
    assert_eq!(response["ok"], true, "{response}");
    let id = response["changes"][0]["id"].clone();

    let notice = b.notice();
    assert_eq!((notice["changes"][0]["id"].clone(), notice["changes"][0]["text"].clone()), (id.clone(), json!("the cat sat on the mat")));
    assert_eq!(notice["memories"], 1);
    b.send(json!({"id": "find", "type": "search", "query": "cat mat"}));
    let hits = b.response("find");
    assert_eq!(hits["hits"][0]["memory"]["id"], id, "{hits}");

    // b cannot cancel a's requests: ids are per client.
    a.send(json!({"id": "long", "type": "ask", "text": "the cat", "remember": false, "stream": true}));
    b.send(json!({"id": "c", "type": "cancel", "target": "long"}));
    let refused = b.response("c");
    assert_eq!(refused["ok"], false);
    assert!(refused["error"].as_str().unwrap().contains("no request"), "{refused}");
    let answer = a.response("long");
    assert_eq!((answer["ok"].clone(), answer["cancelled"].clone()), (json!(true), json!(false)), "{answer}");
    assert!(a.seen.iter().any(|l| l["id"] == "long" && l["event"] == "token"), "tokens were streamed");

    // The commands find the daemon by themselves, and say so.
    let status = json_of(d, &["status", "--json"]);
    assert_eq!(status["daemon"]["pid"], daemon.pid());
    assert_eq!(status["status"]["memories"], 1);
    let listed = json_of(d, &["memory", "list", "--json"]);
    assert_eq!(listed[0]["text"], "the cat sat on the mat");
    // MEMLORA_NO_DAEMON reads as shells set it: 0 still uses the daemon; 1 runs
    // standalone, which the daemon holding the store refuses.
    let through = memlora_command(d).env("MEMLORA_NO_DAEMON", "0").args(["memory", "list", "--json"]).output().unwrap();
    assert!(through.status.success(), "{}", stderr(&through));
    let standalone = memlora_command(d).env("MEMLORA_NO_DAEMON", "1").args(["memory", "list", "--json"]).output().unwrap();
    assert!(!standalone.status.success() && stderr(&standalone).contains("in use by memlora"), "{}", stderr(&standalone));
    let out = memlora_command(d).args(["memory", "add", "a", "dog", "grew"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    while a.notice()["changes"][0]["text"] != "a dog grew" {}
    let asked = json_of(d, &["ask", "--json", "the", "dog"]);
    assert_eq!(asked["daemon"]["pid"], daemon.pid());
    assert_eq!(asked["completion_tokens"], 8);
    // Settings the daemon does not take are refused in one line.
    let out = memlora_command(d).args(["ask", "--temperature", "0.5", "hi"]).output().unwrap();
    assert_one_line_error(&out, &["--temperature", "daemon pid"]);

    let batch = memlora_command(d)
        .arg("batch")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child.stdin.take().unwrap().write_all(b"{\"id\": 1, \"type\": \"memories\"}\nnot json\n")?;
            child.wait_with_output()
        })
        .unwrap();
    let lines: Vec<Value> = String::from_utf8(batch.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0]["memories"].as_array().map(Vec::len), Some(2), "batch mode through the daemon");
    assert_eq!(lines[1]["ok"], false, "a malformed line is answered by batch mode itself");

    // An ingest through the daemon; its changes reach the other clients.
    let transcript = d.join("talk.txt");
    std::fs::write(&transcript, "# 8 May 2023\nMaya: the cat sat on the mat\nSam: a kitten\n").unwrap();
    let out = memlora_command(d).args(["ingest", "--json", transcript.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let last: Value = serde_json::from_str(String::from_utf8(out.stdout).unwrap().lines().last().unwrap()).unwrap();
    assert_eq!(last["summary"]["turns"], 2, "{last}");

    drop((a, b));
    daemon.stop();
    assert_store_verifies(d);
    let status = json_of(d, &["status", "--json"]);
    assert_eq!(status["daemon"], Value::Null);
}

#[test]
fn a_client_killed_mid_answer_leaves_the_daemon_serving() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let daemon = Daemon::start(d, 1500);

    let mut asking = memlora_command(d).args(["ask", "the", "cat", "sat"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    // Killed once the answer streams.
    let mut first = [0u8; 1];
    asking.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
    asking.kill().unwrap();
    asking.wait().unwrap();

    let mut client = Client::connect(d);
    client.send(json!({"id": "after", "type": "remember", "text": "a kitten sat on the report"}));
    let after = client.response("after");
    assert_eq!(after["ok"], true, "{after}");
    client.send(json!({"id": "all", "type": "memories"}));
    let memories = client.response("all");
    assert!(memories["memories"].as_array().unwrap().iter().any(|m| m["text"] == "a kitten sat on the report"));
    drop(client);

    assert!(d.join("memlora.sock").exists());
    daemon.stop();
    assert_store_verifies(d);
}

#[test]
fn garbage_and_oversized_lines_end_only_that_client() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let _daemon = Daemon::start(d, 4);
    let mut good = Client::connect(d);

    let mut garbage = Client::connect(d);
    garbage.send_raw(b"\x00\x01 this is not json\n{\"id\": 1, \"type\": \"memories\"}\n");
    let error = garbage.line().unwrap();
    assert_eq!(error["ok"], false);
    assert!(error["error"].as_str().unwrap().contains("line 1"), "{error}");
    assert_eq!(garbage.line(), None, "disconnected after the error");

    let mut binary = Client::connect(d);
    binary.send_raw(b"\xff\xfe{}\n");
    assert!(binary.line().unwrap()["error"].as_str().unwrap().contains("not UTF-8"));
    assert_eq!(binary.line(), None);

    let mut huge = Client::connect(d);
    let line = vec![b'x'; (1 << 20) + 10];
    // The daemon may hang up before reading everything.
    let _ = huge.writer.write_all(&line);
    let _ = huge.writer.write_all(b"\n");
    let error = huge.line().unwrap();
    assert!(error["error"].as_str().unwrap().contains("longer than"), "{error}");
    assert_eq!(huge.line(), None);

    // A valid line with a bad request is answered, and the connection stays.
    good.send(json!({"id": "bad", "type": "fly"}));
    assert_eq!(good.response("bad")["ok"], false);
    good.send(json!({"id": "ok", "type": "remember", "text": "the dog sat"}));
    assert_eq!(good.response("ok")["ok"], true);
}

#[test]
fn a_second_daemon_on_the_same_data_dir_is_refused_naming_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let daemon = Daemon::start(d, 4);
    let out = memlora_command(d).args(["serve", "--model", tiny_model(d).to_str().unwrap()]).output().unwrap();
    assert_one_line_error(&out, &["already serves", &format!("pid {}", daemon.pid())]);
    // The first one is untouched.
    let mut client = Client::connect(d);
    client.send(json!({"id": "1", "type": "status"}));
    assert_eq!(client.response("1")["ok"], true);
}

#[test]
fn a_stale_socket_of_a_killed_daemon_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut daemon = Daemon::start(d, 4);
    let mut client = Client::connect(d);
    client.send(json!({"id": "1", "type": "remember", "text": "the cat sat"}));
    assert_eq!(client.response("1")["ok"], true);
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    assert!(d.join("memlora.sock").exists(), "a killed daemon leaves its socket");

    // Nothing answers there: the commands run standalone.
    let listed = json_of(d, &["memory", "list", "--json"]);
    assert_eq!(listed[0]["text"], "the cat sat");
    let out = memlora_command(d).args(["serve", "--stop"]).output().unwrap();
    assert_one_line_error(&out, &["no memlora daemon"]);

    let daemon = Daemon::start(d, 4);
    let mut client = Client::connect(d);
    client.send(json!({"id": "2", "type": "memories"}));
    assert_eq!(client.response("2")["memories"][0]["text"], "the cat sat");
    drop(client);
    daemon.stop();
    assert_store_verifies(d);
}

#[test]
fn a_client_that_stops_reading_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let _daemon = Daemon::start(d, 4);
    let mut client = Client::connect(d);
    client.send(json!({"id": "0", "type": "remember", "text": "the quarterly report grew"}));
    assert_eq!(client.response("0")["ok"], true);
    // Many requests, never read: the socket's buffer, then the daemon's queue for this
    // client fill up, and the daemon hangs up instead of keeping the lines.
    let writer = client.writer.try_clone().unwrap();
    let flood = std::thread::spawn(move || {
        let mut writer = writer;
        let line = format!("{}\n", json!({"type": "memories", "events": true}));
        for _ in 0..200_000 {
            if writer.write_all(line.as_bytes()).is_err() {
                return true;
            }
        }
        false
    });
    // The daemon hung up when writing fails or reading ends.
    let hung_up = flood.join().unwrap();
    let mut rest = Vec::new();
    let _ = client.reader.read_to_end(&mut rest);
    assert!(hung_up || !rest.is_empty());
    // Others are served.
    let mut other = Client::connect(d);
    other.send(json!({"id": "1", "type": "status"}));
    assert_eq!(other.response("1")["ok"], true);
}

/// The real default models through the daemon: a memory one client made is what `ask`,
/// answered by the daemon's warm model, recalls.
#[test]
fn the_real_model_answers_through_the_daemon_from_another_clients_memory() {
    let Some(models) = common::real_models() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let real = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_memlora"));
        command
            .arg("--data-dir")
            .arg(d)
            .arg("--models-dir")
            .arg(&models)
            .args(args)
            .env_remove("MEMLORA_DATA_DIR")
            .env_remove("MEMLORA_MODELS_DIR")
            .env_remove("MEMLORA_NO_DAEMON")
            .env("HF_HUB_OFFLINE", "1");
        command
    };
    let daemon = Daemon::spawn(d, real(&["serve"]));
    let mut client = Client::connect(d);
    client.send(json!({"id": "told", "type": "remember", "text": "My sister Alice lives in Lisbon and works as a nurse."}));
    assert_eq!(client.response("told")["ok"], true);

    let out = real(&["ask", "--json", "--no-remember", "Where does my sister Alice live?"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let asked: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(asked["daemon"]["pid"], daemon.pid());
    assert!(asked["text"].as_str().unwrap().contains("Lisbon"), "the answer ignores the memory: {asked}");
    assert!(asked["time_to_first_token_seconds"].as_f64().unwrap() > 0.0);
    drop(client);
    daemon.stop();
}

#[test]
fn images_and_adapter_merges_go_through_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let daemon = Daemon::start_with_vision(d);

    // An image asked about from another directory: the daemon reads it by its absolute path.
    let photos = d.join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    image::RgbImage::from_pixel(20, 10, image::Rgb([200, 10, 10])).save(photos.join("red.png")).unwrap();
    let out = memlora_command(d).current_dir(&photos).args(["ask", "--json", "--image", "red.png", "What colour?"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["looked_at"]["mode"], "native", "{answer}");
    assert!(answer["looked_at"]["path"].as_str().unwrap().starts_with(d.join("images").to_str().unwrap()));

    // A merge is the daemon's job.
    let config = memlora::engine::ChatModel::load(&tiny_model(d), &memlora::engine::LoadOptions::default()).unwrap().decoder_config().clone();
    for (name, seed) in [("style", 1), ("tone", 2)] {
        let path = d.join("incoming").join(name);
        memlora::adapters::LoraAdapter::random(&config, 4, 8.0, &[memlora::engine::TargetModule::Q], 0.5, seed)
            .unwrap()
            .save(&path)
            .unwrap();
        assert!(memlora_command(d).args(["adapters", "import", path.to_str().unwrap()]).output().unwrap().status.success());
    }
    let merged = json_of(d, &["adapters", "merge", "--json", "--into", "both", "style", "tone"]);
    assert_eq!(merged["admission"]["adapter"]["name"], "both", "{merged}");
    daemon.stop();
}

#[test]
fn hostile_requests_fail_alone_and_the_daemon_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let daemon = Daemon::start_with_vision(d);
    let mut client = Client::connect(d);
    client.send(json!({"id": "before", "type": "remember", "text": "My sister lives in Porto."}));
    assert_eq!(client.response("before")["ok"], true);

    let hostile = d.join("hostile");
    std::fs::create_dir_all(&hostile).unwrap();
    let huge_png = hostile.join("huge.png");
    std::fs::copy(common::malformed("png-100000x100000.png"), &huge_png).unwrap();
    let garbage = hostile.join("garbage.json");
    std::fs::write(&garbage, vec![b'{'; 4096]).unwrap();
    let deep = format!("{}{}", "[".repeat(200_000), "]".repeat(200_000));
    let requests = [
        (json!({"id": "image", "type": "ask", "text": "What is this?", "image": huge_png, "remember": false}), "100000 × 100000 pixels"),
        (json!({"id": "attached", "type": "image", "path": huge_png}), "100000 × 100000 pixels"),
        (json!({"id": "zero", "type": "ingest", "path": "/dev/zero"}), "/dev/zero"),
        (json!({"id": "dir", "type": "ingest", "path": hostile}), "hostile"),
        (json!({"id": "json", "type": "ingest", "path": garbage}), "garbage.json"),
        (json!({"id": "deep", "type": "ask", "text": deep, "remember": false}), "shorten the message"),
        (json!({"id": "merge", "type": "merge_adapters", "into": "x", "adapters": ["none-such"]}), "no adapter named 'none-such'"),
        (json!({"id": "edit", "type": "edit", "memory_id": u64::MAX, "text": "x"}), "no memory with id"),
        (json!({"id": "search", "type": "search", "query": "Porto", "top_k": usize::MAX}), ""),
    ];
    for (request, says) in &requests {
        let id = request["id"].as_str().unwrap();
        client.send(request.clone());
        let response = client.response(id);
        if says.is_empty() {
            // Absurd but well-formed: served (a search capped by the store's size).
            assert_eq!(response["ok"], true, "{id}: {response}");
            continue;
        }
        assert_eq!(response["ok"], false, "{id}: {response}");
        let error = response["error"].as_str().unwrap();
        assert_eq!(error.lines().count(), 1, "{id}: {error}");
        assert!(error.contains(says), "{id}: {error}");
    }
    // Bytes that are not a request at all end only that connection.
    let mut rude = Client::connect(d);
    rude.send_raw(format!("{}\n", "[".repeat(100_000)).as_bytes());
    assert_eq!(rude.line().unwrap()["ok"], false);

    client.send(json!({"id": "after", "type": "remember", "text": "My brother lives in Lyon."}));
    let after = client.response("after");
    assert_eq!(after["ok"], true, "{after}");
    client.send(json!({"id": "list", "type": "memories"}));
    let listed = client.response("list");
    assert_eq!(listed["memories"].as_array().map(Vec::len), Some(2), "{listed}");
    daemon.stop();
    assert_store_verifies(d);
}
