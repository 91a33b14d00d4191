//! The status page in a real browser: headless Chromium (Debian's `chromium` package),
//! driven over the Chrome DevTools Protocol. Each page of a server with simulated instances
//! is loaded, checked for what a person would see, and saved as a screenshot under
//! `target/tmp/screenshots/`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::common::{GitRepo, Server, WebSocket, example, http, websocket};
use crate::opamp::converge;

const WAIT: Duration = Duration::from_secs(20);
const HOSTILE_HOST: &str = "<img src=x onerror=alert(1)>";

/// A headless Chromium and one page in it.
struct Browser {
    child: Child,
    socket: WebSocket,
    session: String,
    next_id: u64,
    /// Events received while waiting for replies, oldest first.
    events: Vec<Value>,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Self {
        let profile = tempfile::tempdir().expect("temp dir");
        let binary = ["chromium", "chromium-browser", "google-chrome"]
            .into_iter()
            .find(|name| Command::new(name).arg("--version").output().is_ok_and(|o| o.status.success()))
            .expect("the browser test needs Chromium: `apt-get install chromium` (.ci/run installs it)");
        let mut child = Command::new(binary)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--no-first-run",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (url_tx, url_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = url_tx.send(url.trim().to_owned());
                }
            }
        });
        let url = url_rx.recv_timeout(Duration::from_secs(30)).expect("chromium prints its DevTools address");
        let socket = websocket(url.as_str(), None, Duration::from_secs(30)).expect("DevTools WebSocket");
        let mut browser =
            Self { child, socket, session: String::new(), next_id: 1, events: Vec::new(), _profile: profile };
        let target = browser.call("Target.createTarget", json!({ "url": "about:blank" }));
        let target_id = target["targetId"].as_str().expect("a target id").to_owned();
        let attached = browser.call("Target.attachToTarget", json!({ "targetId": target_id, "flatten": true }));
        browser.session = attached["sessionId"].as_str().expect("a session id").to_owned();
        browser.call("Page.enable", json!({}));
        browser.call("Runtime.enable", json!({}));
        browser
    }

    /// Sends a command (to the page once attached) and returns its result.
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            message["sessionId"] = Value::String(self.session.clone());
        }
        self.socket.send(tungstenite::Message::Text(message.to_string().into())).expect("send to DevTools");
        loop {
            let reply = self.read();
            if reply["id"] == id {
                assert!(reply["error"].is_null(), "{method} failed: {reply}");
                return reply["result"].clone();
            }
            self.events.push(reply);
        }
    }

    fn read(&mut self) -> Value {
        loop {
            match self.socket.read() {
                Ok(tungstenite::Message::Text(text)) => {
                    return serde_json::from_str(&text).expect("JSON from DevTools");
                }
                Ok(_) => continue,
                Err(error) => panic!("DevTools connection failed: {error}"),
            }
        }
    }

    /// Loads `url` and waits for its load event.
    fn open(&mut self, url: &str) {
        self.events.clear();
        self.call("Page.navigate", json!({ "url": url }));
        let deadline = Instant::now() + WAIT;
        while !self.events.iter().any(|e| e["method"] == "Page.loadEventFired") {
            assert!(Instant::now() < deadline, "{url} did not load");
            let event = self.read();
            self.events.push(event);
        }
    }

    /// The value of a JavaScript expression in the page.
    fn eval(&mut self, expression: &str) -> Value {
        let result = self.call("Runtime.evaluate", json!({ "expression": expression, "returnByValue": true }));
        assert!(result["exceptionDetails"].is_null(), "{expression}: {result}");
        result["result"]["value"].clone()
    }

    fn text(&mut self) -> String {
        self.eval("document.body.innerText").as_str().expect("text").to_owned()
    }

    /// Waits until `expression` is true in the page, without reloading it.
    fn wait_until(&mut self, expression: &str, what: &str) {
        let deadline = Instant::now() + WAIT;
        while self.eval(expression) != Value::Bool(true) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}; page text:\n{}", self.text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Saves a full-page PNG under the tests' output directory.
    fn screenshot(&mut self, name: &str) -> std::path::PathBuf {
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png", "captureBeyondViewport": true }));
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("image data"))
            .expect("base64 PNG");
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write the screenshot");
        path
    }

    /// JavaScript dialogs (`alert`) the pages opened: an injected script would.
    fn dialogs(&self) -> usize {
        self.events.iter().filter(|e| e["method"] == "Page.javascriptDialogOpening").count()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn publish_v2(repo: &GitRepo) {
    let text = std::fs::read_to_string(repo.path().join("configs/gateway.yaml")).expect("read");
    repo.write("configs/gateway.yaml", text.replace("send_batch_size: 8192", "send_batch_size: 4096"));
    repo.commit("Smaller batches");
    repo.annotated_tag("gateway/v2", "Smaller batches for the new exporter");
}

#[test]
fn a_person_sees_every_page_live_and_agent_text_stays_text() {
    let repo = example();
    publish_v2(&repo);
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&repo.path().display().to_string(), data.path(), &["--poll-interval", "1h"]);
    let token = server.token("prod-gateway");
    let _agents = [
        converge(&server, &token, [0x51; 16], "gw-1", None),
        converge(&server, &token, [0x52; 16], "gw-2", None),
        converge(&server, &token, [0x53; 16], HOSTILE_HOST, Some("exporter <script>alert(2)</script> refused")),
    ];
    server.wait_for("/api/v1/fleets/prod-gateway", WAIT, "three instances", |f| f["instances"] == 3);
    let base = format!("http://{}", server.web);
    let mut browser = Browser::start();

    // Overview: every fleet, its version and a bar of statuses.
    browser.open(&format!("{base}/"));
    let text = browser.text();
    for expected in
        ["Fleets", "prod-gateway", "staging-gateway", "legacy-edge", "observe only", "2/3 in sync, 1 failed"]
    {
        assert!(text.contains(expected), "overview lacks {expected:?}:\n{text}");
    }
    assert_eq!(browser.eval("document.querySelectorAll('svg.bar').length"), json!(5));
    browser.wait_until("document.querySelector('.live').dataset.state === 'live'", "the live-update stream");
    browser.screenshot("overview");

    // Fleet page: the stats strip, the token, the instance table; the hostile host is text.
    browser.open(&format!("{base}/fleets/prod-gateway"));
    let text = browser.text();
    for expected in
        ["prod-gateway", "gateway/v1", "instances", "in sync", "apply failed", "drift", "Install tokens", "gw-1"]
    {
        assert!(text.contains(expected), "fleet page lacks {expected:?}:\n{text}");
    }
    assert!(text.contains(HOSTILE_HOST), "the host name shows as text:\n{text}");
    assert!(text.contains("exporter <script>alert(2)</script> refused"), "{text}");
    assert_eq!(browser.eval("document.querySelectorAll('main img, main script').length"), json!(0));
    assert_eq!(browser.eval("document.querySelectorAll('main tbody tr').length"), json!(4), "1 token + 3 instances");
    browser.screenshot("fleet");

    // A new instance appears without reloading: the stats strip counts it.
    let stat = "document.querySelector('.stats .stat b').textContent";
    assert_eq!(browser.eval(stat), json!("3"));
    browser.eval("window.loadedOnce = true");
    let _fourth = converge(&server, &token, [0x54; 16], "gw-4", None);
    browser.wait_until(&format!("{stat} === '4'"), "the live update to count the fourth instance");
    assert_eq!(browser.eval("window.loadedOnce"), json!(true), "updated in place, not reloaded");

    // Sorting by host, descending, through the column heading's link.
    browser.open(&format!("{base}/fleets/prod-gateway?sort=host&order=desc"));
    let hosts = browser.eval(
        "[...document.querySelectorAll('main table:last-of-type tbody tr td:nth-child(2)')].map(c => c.textContent)",
    );
    assert_eq!(hosts, json!(["gw-4", "gw-2", "gw-1", HOSTILE_HOST]), "`<` sorts before letters");
    // Relative times, exact on hover.
    let title = browser.eval("document.querySelector('main tbody time').title");
    assert!(title.as_str().is_some_and(|t| t.ends_with(" UTC")), "{title}");

    // Instance page of the hostile one.
    let uid = gitfleet::opamp::codec::InstanceUid([0x53; 16]).to_string();
    browser.open(&format!("{base}/instances/{uid}"));
    let text = browser.text();
    for expected in [
        HOSTILE_HOST,
        "failed",
        "Configuration",
        "Description",
        "Health",
        "Effective configuration",
        "History",
        "host.name",
    ] {
        assert!(text.contains(expected), "instance page lacks {expected:?}:\n{text}");
    }
    assert_eq!(browser.eval("document.querySelectorAll('main img, main script').length"), json!(0));
    browser.screenshot("instance");

    // Configurations, and the diff between two versions.
    browser.open(&format!("{base}/configs"));
    let text = browser.text();
    assert!(text.contains("gateway") && text.contains("node-agent"), "{text}");
    browser.screenshot("configs");
    browser.open(&format!("{base}/configs/gateway"));
    let text = browser.text();
    assert!(text.contains("Changes from gateway/v1 to gateway/v2"), "{text}");
    assert!(text.contains("Smaller batches for the new exporter"), "the tag note:\n{text}");
    // Each diff line carries its numbers on both sides (old, new), then the text.
    let mut line = |class: &str| {
        let script = format!(
            "(() => {{ const l = document.querySelector('.diff .{class}'); \
             return [...l.querySelectorAll('.ln')].map(n => n.textContent).concat([l.lastChild.textContent.trim()]); }})()"
        );
        browser.eval(&script)
    };
    assert_eq!(line("del"), json!(["22", "", "send_batch_size: 8192"]));
    assert_eq!(line("add"), json!(["", "22", "send_batch_size: 4096"]));
    browser.screenshot("config-diff");
    // A version opens whole, numbered.
    browser.open(&format!("{base}/configs/gateway/v2"));
    let text = browser.text();
    assert!(text.contains("gateway/v2") && text.contains("Smaller batches for the new exporter"), "{text}");
    let lines = browser.eval("document.querySelectorAll('.diff .ln').length").as_u64().expect("a count");
    let content = server.json("/api/v1/configs/gateway/versions/v2")["content"].as_str().expect("content").to_owned();
    assert_eq!(lines as usize, content.lines().count());
    browser.screenshot("config-version");

    // Without JavaScript the pages still render, and refresh themselves.
    browser.call("Emulation.setScriptExecutionDisabled", json!({ "value": true }));
    browser.open(&format!("{base}/fleets/prod-gateway"));
    assert!(browser.text().contains("gw-4"));
    let page = server.get("/fleets/prod-gateway").body;
    assert!(page.contains("<noscript><meta http-equiv=\"refresh\" content=\"10\"></noscript>"));

    assert_eq!(browser.dialogs(), 0, "no script from an agent ever ran");
    server.stop();
}

#[test]
fn pages_are_read_only_and_agent_text_is_escaped_in_the_html() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&repo.path().display().to_string(), data.path(), &["--poll-interval", "1h"]);
    let token = server.token("prod-gateway");
    let _agent = converge(&server, &token, [0x61; 16], HOSTILE_HOST, None);
    server.wait_for("/api/v1/fleets/prod-gateway", WAIT, "the instance", |f| f["instances"] == 1);
    let uid = gitfleet::opamp::codec::InstanceUid([0x61; 16]).to_string();
    let pages = ["/", "/fleets/prod-gateway", &format!("/instances/{uid}"), "/configs", "/configs/gateway"];
    for path in pages {
        let page = server.get(path);
        assert_eq!(page.status, 200, "{path}");
        assert_eq!(page.header("content-type").as_deref(), Some("text/html; charset=utf-8"));
        let policy = page.header("content-security-policy").expect("a content security policy");
        assert!(policy.contains("script-src 'self'") && policy.contains("form-action 'none'"), "{policy}");
        assert!(!page.body.contains("<img src=x"), "{path} carries the host name unescaped");
        assert!(!page.body.contains("<form"), "{path} has a form");
        for method in ["POST", "PUT", "DELETE", "PATCH"] {
            let response = http(server.web, method, path, &[], b"");
            assert_eq!(response.status, 405, "{method} {path}");
        }
    }
    assert!(server.get("/fleets/prod-gateway").body.contains("&lt;img src=x onerror=alert(1)&gt;"));
    for path in
        ["/api/v1/repo", "/api/v1/fleets", "/api/v1/fleets/prod-gateway", "/api/v1/instances", "/metrics", "/events"]
    {
        for method in ["POST", "PUT", "DELETE"] {
            assert_eq!(http(server.web, method, path, &[], b"").status, 405, "{method} {path}");
        }
    }
    assert_eq!(server.get("/fleets/no-such-fleet").status, 404);
    assert_eq!(server.get("/instances/not-a-uuid").status, 404);
    assert_eq!(server.get("/configs/no-such-config").status, 404);
    let unknown = server.get("/configs/gateway?from=v9&to=v1");
    assert_eq!(unknown.status, 404);
    assert!(unknown.body.contains("<code>v9</code> is not published: nothing to compare"), "{}", unknown.body);
    assert_eq!(server.get("/configs/gateway/v9").status, 404);
    assert!(!unknown.body.contains("1 published versions"), "{}", unknown.body);

    let metrics = server.get("/metrics");
    assert_eq!(metrics.header("content-type").as_deref(), Some("text/plain; version=0.0.4; charset=utf-8"));
    for expected in [
        "gitfleet_instances{fleet=\"prod-gateway\",status=\"in_sync\"} 1\n",
        "# TYPE gitfleet_opamp_messages_received_total counter\n",
        "gitfleet_reconciles_total 1\n",
        "gitfleet_git_fetch_errors_total 0\n",
        "# TYPE gitfleet_reconcile_duration_seconds gauge\n",
        "# TYPE gitfleet_status_commits_total counter\n",
    ] {
        assert!(metrics.body.contains(expected), "{expected:?} in\n{}", metrics.body);
    }
    // What this replica alone does is labelled with its name: the host name and port.
    let replica = server.json("/api/v1/repo")["replica"]["name"].as_str().expect("a name").to_owned();
    assert!(replica.ends_with(&format!(":{}", server.opamp.port())), "{replica}");
    for expected in [
        format!("gitfleet_leader{{replica=\"{replica}\"}} 1\n"),
        format!("gitfleet_instances_connected{{replica=\"{replica}\",transport=\"websocket\"}} 1\n"),
    ] {
        assert!(metrics.body.contains(&expected), "{expected:?} in\n{}", metrics.body);
    }
    let received = metrics
        .body
        .lines()
        .find_map(|line| line.strip_prefix("gitfleet_opamp_messages_received_total{")?.split_once("} ").map(|(_, v)| v))
        .and_then(|value| value.parse::<u64>().ok());
    assert_eq!(received, Some(2), "the agent's hello and its report");
    server.stop();
}
