//! The trust boundaries, each promise tested as the attack on it: a
//! compromised cache (an HTTPS server in this test, with a certificate
//! from the lab CA) replaying old desired states and stale signatures or
//! streaming segments forever, a key rotation then a rollback, an agent
//! certificate asking for packs between subtrees, idle connections at a
//! low open-files limit, a CA-issued wildcard certificate, a flood of
//! pulls during a sync, an edit in place during the post-switch hook,
//! a crash repair, and the dashboard under another Host name.

use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

/// What a compromised cache answers for a path: `(status, body)`, a body
/// streamed forever, or 404.
enum Answer {
    Bytes(u16, Vec<u8>),
    Forever(Vec<u8>, Vec<u8>),
    NotFound,
}

/// A compromised cache: HTTPS with the lab CA's server certificate, each
/// request answered by `answer(path)`.
struct EvilCache {
    url: String,
    rt: Option<tokio::runtime::Runtime>,
}

impl EvilCache {
    fn start(env: &Env, answer: impl Fn(&str) -> Answer + Send + Sync + 'static) -> EvilCache {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let files = tls_files(env, "server");
        let answer = Arc::new(answer);
        let url = rt.block_on(async move {
            let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = tcp.local_addr().unwrap().port();
            let config = scap::net::tls::server_config(&files).unwrap();
            let listener = scap::net::tls::Listener::new(
                tcp,
                Some(config),
                scap::net::conns::Limits::default(),
            )
            .unwrap();
            let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
                let answer = answer.clone();
                async move {
                    use axum::response::IntoResponse;
                    match answer(req.uri().path()) {
                        Answer::Bytes(status, body) => {
                            (axum::http::StatusCode::from_u16(status).unwrap(), body)
                                .into_response()
                        }
                        Answer::Forever(first, again) => {
                            let s = futures_util::stream::iter(
                                std::iter::once(first).chain(std::iter::repeat(again)),
                            )
                            .map(|b| Ok::<_, std::io::Error>(axum::body::Bytes::from(b)));
                            axum::body::Body::from_stream(s).into_response()
                        }
                        Answer::NotFound => axum::http::StatusCode::NOT_FOUND.into_response(),
                    }
                }
            });
            tokio::spawn(scap::net::server::serve(
                listener,
                app,
                std::future::pending(),
            ));
            format!("https://127.0.0.1:{port}")
        });
        EvilCache { url, rt: Some(rt) }
    }
}

impl Drop for EvilCache {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

use futures_util::StreamExt;

fn tree(root: &std::path::Path, tag: &str) {
    write(root, "index.php", b"<?php // entry\n");
    write(
        root,
        "shared/unchanged.php",
        b"<?php // the same in every version\n",
    );
    write(root, "wmf-config/tag.php", tag.as_bytes());
}

/// A client certificate for `name`, issued by the lab CA into the lab's
/// directory as `role`.
fn issue_client(env: &Env, role: &str, name: &str) {
    let dir = env.path("pki");
    let key = rcgen::KeyPair::from_pem(&fs::read_to_string(dir.join("ca.key")).unwrap()).unwrap();
    // The lab CA again: its name and key are what a certificate's chain
    // is checked against.
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "scap lab CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = params.self_signed(&key).unwrap();
    let leaf = scap::pki::Leaf {
        role,
        names: vec![name.to_string()],
        server: false,
        client: true,
        days: 30,
    };
    scap::pki::issue(&dir, &leaf, &ca, &key).unwrap();
}

/// Two versions of a small tree in the fleet's store (`tree`'s "v1" and
/// "v2"), and the fleet's `scap serve`: the staging dir and their IDs.
fn two_versions(fleet: &mut Fleet) -> (std::path::PathBuf, String, String) {
    let st = fleet.env.path("staging");
    tree(&st, "v1");
    let v1 = fleet.env.build(&[("mediawiki", &st)], &[]);
    tree(&st, "v2");
    let v2 = fleet.env.build(&[("mediawiki", &st)], &[]);
    fleet.serve();
    (st, v1, v2)
}

/// A compromised cache that answers `path` with `body`, and 404 to the rest.
fn serving(env: &Env, path: String, body: Vec<u8>) -> EvilCache {
    EvilCache::start(env, move |p| {
        if p == path {
            Answer::Bytes(200, body.clone())
        } else {
            Answer::NotFound
        }
    })
}

/// `scap pull` on host 0 through its local socket (as root: the tests run
/// as root; one arriving during the agent's own pull at start waits for
/// it).
fn pull(fleet: &Fleet, sock: &std::path::Path) -> std::process::Output {
    fleet
        .env
        .cmd()
        .args(["pull", "--socket"])
        .arg(sock)
        .output()
        .unwrap()
}

/// Waits until host 0's agent is done with its pull at start.
fn idle(fleet: &Fleet) {
    wait_for(60, "the agent's pull at start", || {
        fleet.get(0, "/v1/state").1["busy"] == false
    });
}

fn get_bytes(client: &reqwest::blocking::Client, url: &str) -> (u16, Vec<u8>) {
    let r = client.get(url).send().unwrap();
    (r.status().as_u16(), r.bytes().unwrap().to_vec())
}

/// Finding 2: a cache that answers `/v1/desired/<host>` with an old (but
/// once genuine) answer, or with an unsigned one, never moves a host back,
/// at start or on `scap pull`.
#[test]
fn a_cache_replaying_an_old_desired_state_never_moves_a_host_back() {
    let mut fleet = Fleet::start(1);
    let (_, v1, v2) = two_versions(&mut fleet);
    ok(&fleet.sync(&[0], &v1));
    // What the deploy host said then (mw1001 runs v1): signed, as a cache
    // keeps it.
    let reader = fleet.env.client("agent");
    let (code, old) = get_bytes(&reader, &format!("{}/v1/desired/mw1001", fleet.source()));
    assert_eq!(code, 200);
    let old_json: serde_json::Value = serde_json::from_slice(&old).unwrap();
    assert_eq!(old_json["version"], v1.as_str());
    assert!(
        old_json["order"].is_object(),
        "the answer is signed: {old_json}"
    );
    ok(&fleet.sync(&[0], &v2));
    // The agent restarts with only the compromised cache as its source.
    let cache = serving(&fleet.env, "/v1/desired/mw1001".into(), old.clone());
    let sock = fleet.hosts[0].dir.join("agent.sock");
    fleet.hosts[0].extra = vec!["--source".into(), cache.url.clone()];
    fleet.restart(0);
    idle(&fleet);
    // At start it pulls by itself; then `scap pull` as root, on the host.
    let out = pull(&fleet, &sock);
    let said = ok_out(&out);
    assert!(
        said.contains("older than the newest order this host took"),
        "{said}"
    );
    assert_eq!(fleet.current(0).as_deref(), Some(v2.as_str()));
    let (_, state) = fleet.get(0, "/v1/state");
    let history = state["state"]["history"].as_array().unwrap();
    assert!(
        history
            .iter()
            .all(|e| e["action"] != "pull" || e["version"] != v1.as_str()),
        "no pull to v1 was recorded: {state}"
    );
    // The same answer with its order stripped: ignored, and the cache named.
    let mut unsigned = old_json.clone();
    unsigned.as_object_mut().unwrap().remove("order");
    let bare = serving(
        &fleet.env,
        "/v1/desired/mw1001".into(),
        serde_json::to_vec(&unsigned).unwrap(),
    );
    fleet.hosts[0].extra = vec!["--source".into(), bare.url.clone()];
    fleet.restart(0);
    idle(&fleet);
    let out = pull(&fleet, &sock);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains(&bare.url) && e.contains("not signed"), "{e}");
    assert_eq!(fleet.current(0).as_deref(), Some(v2.as_str()));
    // Over the network a pull needs a deployer: a host's own certificate
    // (any site certificate) is refused, naming what to use.
    let r = reader
        .post(format!("{}/v1/pull", fleet.hosts[0].proc.url))
        .json(&json!({}))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    // And the deploy host's own answer, newer than every order, still
    // moves the host (a host that was down during a rollback, say).
    ok(&fleet.run(&["rollback", "--to", &v1, "--yes"]));
    fleet.hosts[0].extra = vec!["--source".into(), fleet.source()];
    fleet.restart(0);
    idle(&fleet);
    let out = pull(&fleet, &sock);
    ok(&out);
    assert_eq!(fleet.current(0).as_deref(), Some(v1.as_str()));
}

/// Findings 3 and 4: the README's key rotation done step by step, then a
/// rollback, with a cache that kept the old signature listed first: the
/// rollback takes the new signature from the deploy host, skipping the
/// cache.
#[test]
fn after_a_key_rotation_a_rollback_works_and_a_stale_signature_is_skipped() {
    let mut fleet = Fleet::start(0);
    let NewKey {
        key: new_key,
        public: new_pub,
        lab_id,
        trust_both,
    } = NewKey::make(&fleet.env);
    let dir = fleet.env.path("hosts/mw0");
    fleet.add_host_with("mw0", &dir, &trust_both);
    let (st, v1, v2) = two_versions(&mut fleet);
    ok(&fleet.sync(&[0], &v1));
    ok(&fleet.sync(&[0], &v2));
    let old_sig = fs::read(fleet.env.store.join(format!("versions/{v1}.sig"))).unwrap();
    // 1. Re-sign every version hosts may go back to with the new key.
    for v in [&v1, &v2] {
        fleet
            .env
            .ok(&["sign", v, "--key", new_key.to_str().unwrap()]);
    }
    // 2. Agents trust the new key and revoke the old one.
    fleet.hosts[0].extra = [
        trust_both.clone(),
        vec!["--revoked-key".into(), lab_id.clone()],
    ]
    .concat();
    fleet.restart(0);
    // A cache that still serves v1's old signature (nginx kept it).
    let cache = serving(&fleet.env, format!("/versions/{v1}.sig"), old_sig);
    // 3. A rollback to the previous version: its signature kept on the
    // host is by the revoked key; the cache's too; the deploy host's
    // verifies.
    let (code, r) = fleet.post(
        0,
        "/v1/rollback",
        json!({"to": "previous", "sources": [cache.url, fleet.source()]}),
    );
    assert_eq!(code, 200, "{r}");
    assert_eq!(fleet.current(0).as_deref(), Some(v1.as_str()));
    // The host keeps the signature that verifies now.
    let kept = fs::read_to_string(dir.join(format!("store/versions/{v1}.sig"))).unwrap();
    let new_id = scap::store::signature::PublicKey::load(&new_pub)
        .unwrap()
        .id
        .to_string();
    assert!(kept.contains(&new_id), "{kept}");
    // With only a stale cache to ask, a rollback to v2 (whose kept
    // signature is by the revoked key) is refused, naming the cache and
    // the key; the host stays where it is.
    let old_v2 = fs::read(dir.join(format!("store/versions/{v2}.sig"))).unwrap();
    let stale_v2 = serving(&fleet.env, format!("/versions/{v2}.sig"), old_v2.clone());
    let (code, r) = fleet.post(
        0,
        "/v1/rollback",
        json!({"to": v2, "sources": [stale_v2.url]}),
    );
    assert_eq!(code, 403, "{r}");
    let e = r["error"].as_str().unwrap();
    assert!(e.contains(&stale_v2.url) && e.contains(&lab_id), "{e}");
    assert_eq!(fleet.current(0).as_deref(), Some(v1.as_str()));
    // A sync whose signature comes from the sources: a cache that passes
    // another version's signature off as v3's is skipped and named in the
    // outcome, the deploy host's copy taken.
    tree(&st, "v3");
    let v3 = fleet.env.build(
        &[("mediawiki", &st)],
        &["--sign-key", new_key.to_str().unwrap()],
    );
    let wrong = serving(&fleet.env, format!("/versions/{v3}.sig"), old_v2);
    let (code, r) = fleet.post(
        0,
        "/v1/sync",
        json!({"version": v3, "sources": [wrong.url.clone(), fleet.source()]}),
    );
    assert_eq!(code, 200, "{r}");
    assert_eq!(fleet.current(0).as_deref(), Some(v3.as_str()));
    let skipped = r["fetched"]["skipped"].to_string();
    assert!(skipped.contains(&wrong.url), "the cache is named: {r}");
    // 4. The desired targets the old key signed (mw0: v2, from the deploy
    // before the rotation) are ignored, a pull naming the key, until
    // `scap sign --desired` signs them anew; then the host follows its
    // target.
    fleet.hosts[0].extra = [
        trust_both.clone(),
        vec![
            "--revoked-key".into(),
            lab_id.clone(),
            "--source".into(),
            fleet.source(),
        ],
    ]
    .concat();
    fleet.restart(0);
    idle(&fleet);
    let sock = dir.join("agent.sock");
    let out = pull(&fleet, &sock);
    assert!(!out.status.success());
    assert!(stderr(&out).contains(&lab_id), "{}", stderr(&out));
    fleet
        .env
        .ok(&["sign", "--desired", "--key", new_key.to_str().unwrap()]);
    let said = ok_out(&pull(&fleet, &sock));
    assert!(said.contains("caught up"), "{said}");
    assert_eq!(fleet.current(0).as_deref(), Some(v2.as_str()));
}

/// Finding 5: an agent certificate asking for packs between trees that
/// are not recorded versions (a subdirectory) gets 404 and nothing is
/// built; builds on request are bounded per client.
#[test]
fn packs_are_built_only_between_recorded_versions_within_a_budget() {
    let fleet = Fleet::start(0);
    let st = fleet.env.path("staging");
    let mut versions = Vec::new();
    for tag in ["v1", "v2", "v3"] {
        tree(&st, tag);
        versions.push(fleet.env.build(&[("mediawiki", &st)], &[]));
    }
    let p = fleet.serve_store(
        &fleet.env.store.clone(),
        &["--packs-ahead", "0", "--pack-builds-per-client", "2"],
    );
    let agent = fleet.env.client("agent");
    let record: serde_json::Value = serde_json::from_slice(
        &fs::read(
            fleet
                .env
                .store
                .join(format!("versions/{}.json", versions[0])),
        )
        .unwrap(),
    )
    .unwrap();
    let subtree = record["components"][0]["tree"]
        .as_str()
        .unwrap()
        .to_string();
    let packs = || {
        fs::read_dir(fleet.env.store.join("packs"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    for (from, to) in [
        (subtree.as_str(), versions[1].as_str()),
        ("empty", subtree.as_str()),
        (versions[0].as_str(), subtree.as_str()),
    ] {
        let (code, body) = get_bytes(&agent, &format!("{}/v1/pack4/{from}/{to}", p.url));
        let body = String::from_utf8_lossy(&body);
        assert_eq!(code, 404, "{body}");
        assert!(
            body.contains("not a version this deploy host recorded"),
            "{body}"
        );
    }
    assert_eq!(packs(), 0, "nothing was built");
    // Two builds, then this client's budget is spent (429, named); packs
    // already built stay free.
    let pack = |a: usize, b: usize| {
        get_bytes(
            &agent,
            &format!("{}/v1/pack4/{}/{}", p.url, versions[a], versions[b]),
        )
    };
    assert_eq!(pack(0, 1).0, 200);
    assert_eq!(pack(0, 2).0, 200);
    let (code, body) = pack(1, 2);
    let body = String::from_utf8_lossy(&body);
    assert_eq!(code, 429, "{body}");
    assert!(
        body.contains("127.0.0.1") && body.contains("packs built this hour"),
        "{body}"
    );
    assert_eq!(pack(0, 1).0, 200);
    assert_eq!(packs(), 2);
}

/// Finding 6: 1,100 idle TLS connections against `scap serve` at a
/// 1024-file limit; a valid agent's request is still answered within 2 s.
#[test]
fn idle_connections_cannot_keep_a_valid_agent_out() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    // This test process holds the 1,100 connections.
    let mut lim = getrlimit(Resource::Nofile);
    let need = 1400;
    assert!(
        lim.maximum.is_none_or(|m| m >= need),
        "the test needs {need} open files (ulimit -Hn): raise the hard limit"
    );
    if lim.current.is_some_and(|c| c < need) {
        lim.current = Some(need);
        setrlimit(Resource::Nofile, lim).unwrap();
    }
    let fleet = Fleet::start(0);
    let st = fleet.env.path("staging");
    tree(&st, "v1");
    fleet.env.build(&[("mediawiki", &st)], &[]);
    // scap serve at a hard limit of 1024 open files: it cannot raise it.
    let mut sh = std::process::Command::new("sh");
    sh.arg("-c")
        .arg("ulimit -Sn 1024 && ulimit -Hn 1024 && exec \"$@\"")
        .arg("sh")
        .arg(SCAP);
    let cmd = fleet.serve_command(sh, &fleet.env.store, &[]);
    let server = Proc::start(cmd);
    let config = Arc::new(scap::net::tls::client_config(&tls_files(&fleet.env, "agent")).unwrap());
    let addr = format!("127.0.0.1:{}", server.port());
    let mut held = Vec::new();
    // Every one connects and finishes its handshake (the server takes a
    // new connection in place of the oldest idle one), then sends nothing.
    for _ in 0..1100 {
        held.push(tls_to(&addr, &config));
    }
    let agent = fleet.env.client("agent");
    let t = Instant::now();
    let r = agent
        .get(format!("{}/v1/desired/mw1001", server.url))
        .timeout(Duration::from_secs(2))
        .send()
        .expect("a valid agent is answered within 2 s");
    assert_eq!(r.status().as_u16(), 200);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    drop(held);
}

/// Finding 8: a certificate the site CA issued for `*.eqiad.wmnet` is not
/// the deployer `deploy1002.eqiad.wmnet`; a certificate naming it exactly
/// is. A wildcard given as --deployer is refused at start.
#[test]
fn a_wildcard_certificate_is_not_a_deployer() {
    let mut fleet = Fleet::start(0);
    let issue = |role: &str, name: &str| issue_client(&fleet.env, role, name);
    issue("wildcard", "*.eqiad.wmnet");
    issue("deploy1002", "deploy1002.eqiad.wmnet");
    let dir = fleet.env.path("hosts/mw0");
    fleet.add_host_with(
        "mw0",
        &dir,
        &["--deployer".into(), "deploy1002.eqiad.wmnet".into()],
    );
    let url = format!("{}/v1/cancel", fleet.hosts[0].proc.url);
    let wild = fleet.env.client("wildcard");
    let r = wild.post(&url).json(&json!({})).send().unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert!(r.text().unwrap().contains("deploy1002.eqiad.wmnet"));
    let exact = fleet.env.client("deploy1002");
    let r = exact.post(&url).json(&json!({})).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // --deployer '*.eqiad.wmnet' is refused, naming it.
    let out = fleet
        .agent_command(
            std::process::Command::new(SCAP),
            "mw1",
            &fleet.env.path("hosts/mw1"),
            "127.0.0.1:0",
            &["--deployer".into(), "*.eqiad.wmnet".into()],
            &[],
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("*.eqiad.wmnet") && stderr(&out).contains("wildcard"));
}

/// Finding 7: a flood of pulls from a site certificate during a sync is
/// refused (403) and the sync goes through; the host's history records the
/// deployer's certificate name, not the body's "by".
#[test]
fn a_pull_flood_cannot_fail_a_deploy() {
    let mut fleet = Fleet::start(1);
    let st = fleet.env.path("staging");
    tree(&st, "v1");
    let v1 = fleet.env.build(&[("mediawiki", &st)], &[]);
    fleet.serve();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        let client = fleet.env.client("agent");
        let url = format!("{}/v1/pull", fleet.hosts[0].proc.url);
        std::thread::spawn(move || {
            let mut codes = std::collections::BTreeSet::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(r) = client.post(&url).json(&json!({"by": "mallory"})).send() {
                    codes.insert(r.status().as_u16());
                }
            }
            codes
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let mut body = fleet.sync_body(&v1, &[&fleet.source()]);
    body["by"] = json!("mallory");
    let (code, r) = fleet.post(0, "/v1/sync", body);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let codes = flood.join().unwrap();
    assert_eq!(code, 200, "{r}");
    assert_eq!(codes.into_iter().collect::<Vec<_>>(), vec![403]);
    let (_, state) = fleet.get(0, "/v1/state");
    assert_eq!(state["state"]["current"]["by"], "scap-deployer", "{state}");
}

/// Finding 1: an edit in place made through the live path while the
/// post-switch hook runs (the new slot still muted) is never served by a
/// rollback: the previous slot shares that file.
#[test]
fn an_edit_during_the_post_switch_hook_never_reaches_a_rollback() {
    let fleet = Fleet::start_with(
        1,
        &[
            "--post-switch",
            "touch $SCAP_RELEASE_DIR/../../hook-started; sleep 3",
        ],
    );
    let st = fleet.env.path("staging");
    tree(&st, "v1");
    let v1 = fleet.env.build(&[("mediawiki", &st)], &[]);
    tree(&st, "v2");
    let v2 = fleet.env.build(&[("mediawiki", &st)], &[]);
    let mut fleet = fleet;
    fleet.serve();
    assert_eq!(fleet.sync_to(0, &v1).0, 200);
    // Let the work after that switch (watching the slots) end.
    wait_for(60, "the agent idle", || {
        fleet.get(0, "/v1/state").1["busy"] == false
    });
    // (The first switch's hook left its marker.)
    let marker = fleet.hosts[0].dir.join("hook-started");
    fs::remove_file(&marker).unwrap();
    let req = fleet
        .request("POST", 0, "/v1/sync")
        .json(&fleet.sync_body(&v2, &[&fleet.source()]));
    let sync = std::thread::spawn(move || req.send().unwrap().status().as_u16());
    wait_for(60, "the post-switch hook", || marker.exists());
    let shared = fleet.live(0, "mediawiki").join("shared/unchanged.php");
    let mut f = fs::OpenOptions::new().append(true).open(&shared).unwrap();
    use std::io::Write;
    f.write_all(b"// edited by hand\n").unwrap();
    drop(f);
    assert_eq!(sync.join().unwrap(), 200);
    wait_for(60, "the work after the switch", || {
        fleet.get(0, "/v1/state").1["busy"] == false
    });
    let (code, r) = fleet.post(0, "/v1/rollback", json!({"to": "previous"}));
    assert_eq!(code, 200, "{r}");
    assert_eq!(fleet.current(0).as_deref(), Some(v1.as_str()));
    assert_eq!(
        fs::read(fleet.live(0, "mediawiki").join("shared/unchanged.php")).unwrap(),
        b"<?php // the same in every version\n",
        "the rollback serves v1's content"
    );
    let (_, d) = fleet.get(0, "/v1/verify");
    assert_eq!(d["changes"], json!([]), "{d}");
}

/// Finding 9: a cache that streams valid pack segments forever (the same
/// object again and again) is skipped within the stall bound, named, and
/// the sync finishes from the next source.
#[test]
fn a_source_streaming_segments_forever_is_skipped() {
    let mut fleet = Fleet::start_with(1, &["--source-stall-timeout", "2s"]);
    let (_, v1, v2) = two_versions(&mut fleet);
    assert_eq!(fleet.sync_to(0, &v1).0, 200);
    // A real object of v2, framed as a pack's batch body would carry it.
    let agent = fleet.env.client("agent");
    let root = &v2[..];
    let (code, object) = get_bytes(
        &agent,
        &format!("{}/objects/{}/{}", fleet.source(), &root[..2], &root[2..]),
    );
    assert_eq!(code, 200);
    let id = (0..32)
        .map(|i| u8::from_str_radix(&root[2 * i..2 * i + 2], 16).unwrap())
        .collect::<Vec<u8>>();
    let frame = |with_magic: bool| {
        let mut raw = Vec::new();
        if with_magic {
            raw.extend_from_slice(b"scapbat1");
        }
        for _ in 0..64 {
            raw.extend_from_slice(&id);
            raw.push(0);
            raw.extend_from_slice(&(object.len() as u32).to_le_bytes());
            raw.extend_from_slice(&object);
        }
        let z = zstd::bulk::compress(&raw, 3).unwrap();
        let mut seg = (z.len() as u32).to_le_bytes().to_vec();
        seg.extend_from_slice(&z);
        seg
    };
    let (first, again) = (frame(true), frame(false));
    let cache = EvilCache::start(&fleet.env, move |p| {
        if p.starts_with("/v1/pack4/") {
            Answer::Forever(first.clone(), again.clone())
        } else {
            Answer::NotFound
        }
    });
    let t = Instant::now();
    let (code, r) = fleet.post(
        0,
        "/v1/sync",
        fleet.sync_body(&v2, &[&cache.url, &fleet.source()]),
    );
    assert_eq!(code, 200, "{r}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    let skipped = r["fetched"]["skipped"].to_string();
    assert!(
        skipped.contains(&cache.url) && skipped.contains("stalled or looping"),
        "{r}"
    );
    assert_eq!(fleet.current(0).as_deref(), Some(v2.as_str()));
}

/// Suspected: a crash between the switch and the state file's write (the
/// agent killed during its post-switch hook) is repaired at start from the
/// `current` symlink, with the replay floor of the live version: a sync
/// to an older version stays refused.
#[test]
fn a_crash_repair_keeps_the_replay_floor() {
    // A switch reaches the state file with its record, after the
    // post-switch hook: the agent is killed during the hook, the state
    // file still naming v1 while `current` points to v2.
    let fleet = Fleet::start_with(
        1,
        &[
            "--post-switch",
            "m=$SCAP_RELEASE_DIR/../../in-hook; touch $m; for i in $(seq 600); do [ -e $m ] || break; sleep 0.1; done",
        ],
    );
    let st = fleet.env.path("staging");
    tree(&st, "v1");
    let v1 = fleet.env.build(&[("mediawiki", &st)], &[]);
    std::thread::sleep(Duration::from_millis(1100));
    tree(&st, "v2");
    let v2 = fleet.env.build(&[("mediawiki", &st)], &[]);
    let mut fleet = fleet;
    fleet.serve();
    let marker = fleet.hosts[0].dir.join("in-hook");
    let v1_sync = fleet
        .request("POST", 0, "/v1/sync")
        .json(&fleet.sync_body(&v1, &[&fleet.source()]));
    let first = std::thread::spawn(move || v1_sync.send().unwrap().status().as_u16());
    wait_for(60, "the first switch's hook", || marker.exists());
    fs::remove_file(&marker).unwrap();
    assert_eq!(first.join().unwrap(), 200);
    let req = fleet
        .request("POST", 0, "/v1/sync")
        .json(&fleet.sync_body(&v2, &[&fleet.source()]));
    let sync = std::thread::spawn(move || req.send().map(|r| r.status().as_u16()));
    wait_for(60, "the second switch's hook", || marker.exists());
    // What the agent answers is v2 at once; its state file names v1 until
    // the operation's record.
    assert_eq!(
        fleet.get(0, "/v1/state").1["state"]["current"]["version"],
        v2.as_str()
    );
    let path = fleet.hosts[0].dir.join("state.json");
    let on_disk: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    assert_eq!(on_disk["current"]["version"], v1.as_str(), "{on_disk}");
    fleet.hosts[0].proc.kill();
    assert!(sync.join().unwrap().is_err(), "the agent died mid-request");
    fs::remove_file(&marker).unwrap();
    fleet.restart(0);
    let (_, s) = fleet.get(0, "/v1/state");
    assert_eq!(s["state"]["current"]["version"], v2.as_str(), "{s}");
    assert_eq!(s["state"]["previous"]["version"], v1.as_str(), "{s}");
    assert_eq!(s["state"]["history"][0]["action"], "repair", "{s}");
    assert!(s["state"]["current"]["signed_time"].is_u64(), "{s}");
    let on_disk: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    assert_eq!(on_disk["current"]["version"], v2.as_str(), "{on_disk}");
    let (code, r) = fleet.sync_to(0, &v1);
    assert_eq!(code, 409, "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("never goes back in time"),
        "{r}"
    );
}

/// Suspected: the dashboard answers only to its own names (no DNS
/// rebinding through a deployer's tunnel).
#[test]
fn the_dashboard_refuses_other_host_names() {
    let mut fleet = Fleet::start(0);
    let st = fleet.env.path("staging");
    tree(&st, "v1");
    fleet.env.build(&[("mediawiki", &st)], &[]);
    fleet.serve();
    let dash = fleet.server.as_ref().unwrap().dashboard();
    let plain = reqwest::blocking::Client::new();
    let r = plain
        .get(format!("{dash}/api/v1/fleet"))
        .header("Host", "attacker.example:8468")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 421);
    assert!(r.text().unwrap().contains("attacker.example"));
    let port = dash.rsplit(':').next().unwrap().to_string();
    let r = plain
        .get(format!("{dash}/api/v1/fleet"))
        .header("Host", format!("localhost:{port}"))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

/// The lab PKI's files for a process of `role`.
fn tls_files(env: &Env, role: &str) -> scap::net::tls::TlsFiles {
    scap::net::tls::TlsFiles {
        ca: env.pki.ca(),
        cert: env.pki.cert(role),
        key: env.pki.key(role),
    }
}

/// A TLS connection to `addr` with `config`, handshake done.
fn tls_to(
    addr: &str,
    config: &Arc<rustls::ClientConfig>,
) -> (std::net::TcpStream, rustls::ClientConnection) {
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut tls =
        rustls::ClientConnection::new(config.clone(), "127.0.0.1".try_into().unwrap()).unwrap();
    while tls.is_handshaking() {
        tls.complete_io(&mut tcp).unwrap();
    }
    (tcp, tls)
}

/// Finding 6, the busy side: a request whose body never comes holds no
/// connection. On an agent, a caller without a certificate is refused
/// before its body is read; on `scap serve`, a site certificate that
/// sends a request head and no body is closed after the idle timeout.
#[test]
fn a_request_whose_body_never_comes_holds_no_connection() {
    use std::io::{Read, Write};
    let mut fleet = Fleet::start(1);
    let st = fleet.env.path("staging");
    tree(&st, "v1");
    fleet.env.build(&[("mediawiki", &st)], &[]);
    let server = fleet.serve_store(&fleet.env.store.clone(), &["--idle-timeout", "2s"]);
    fleet.server = Some(server);
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        for c in scap::net::tls::load_certs(&fleet.env.pki.ca()).unwrap() {
            r.add(c).unwrap();
        }
        r
    };
    let anonymous = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let head = b"POST /v1/sync HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 65536\r\n\r\n";
    let agent_addr = format!("127.0.0.1:{}", fleet.hosts[0].proc.port());
    let (mut tcp, mut tls) = tls_to(&agent_addr, &anonymous);
    let t = Instant::now();
    {
        let mut stream = rustls::Stream::new(&mut tls, &mut tcp);
        stream.write_all(head).unwrap();
        let mut answer = [0u8; 12];
        stream.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"HTTP/1.1 401", "refused before its body");
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // scap serve: an agent's certificate, a batch head, no body.
    let config = Arc::new(scap::net::tls::client_config(&tls_files(&fleet.env, "agent")).unwrap());
    let serve_addr = format!("127.0.0.1:{}", fleet.server.as_ref().unwrap().port());
    let (mut tcp, mut tls) = tls_to(&serve_addr, &config);
    let t = Instant::now();
    let mut stream = rustls::Stream::new(&mut tls, &mut tcp);
    stream
        .write_all(b"POST /batch HTTP/1.1\r\nHost: x\r\nContent-Length: 64\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 64];
    // Closed (EOF, or a reset) within the idle timeout and the reaper's
    // tick, not held for the stall bound.
    let r = stream.read(&mut buf);
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(10),
        "{took:?}"
    );
}
