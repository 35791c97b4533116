//! TLS and signed versions on a real local fleet: every refusal (a
//! certificate from another CA, an expired one, one for another name, none
//! at all, plain HTTP on a TLS port; a version unsigned, signed by a key
//! not trusted or revoked, signed for another root, an old one replayed),
//! each naming what was wrong and leaving the host as it was; a key
//! rotation; and what a capture of the wire shows.

use std::fs;
use std::path::Path;

use serde_json::json;

use crate::support::*;

/// A small tree; `tag` makes each version different.
fn tree(root: &Path, tag: &str) {
    write(root, "index.php", format!("<?php // {tag}\n").as_bytes());
    write(root, "includes/a.php", b"<?php // a\n");
}

/// Replaces the lab PKI with one whose CA this test also uses to issue
/// odd certificates: returns the CA.
fn own_pki(env: &Env) -> (rcgen::Certificate, rcgen::KeyPair) {
    let dir = &env.pki.dir;
    let (ca, key) = scap::pki::new_ca(dir, "test CA", 30).unwrap();
    for (role, names, days) in [
        ("server", vec!["127.0.0.1".to_string()], 30),
        ("deployer", vec![scap::pki::DEPLOYER.to_string()], 30),
        ("agent", vec!["127.0.0.1".to_string()], 30),
        ("agent-expired", vec!["127.0.0.1".to_string()], -2),
        ("agent-elsewhere", vec!["elsewhere.example".to_string()], 30),
    ] {
        let leaf = scap::pki::Leaf {
            role,
            names,
            server: true,
            client: true,
            days,
        };
        scap::pki::issue(dir, &leaf, &ca, &key).unwrap();
    }
    (ca, key)
}

fn cert_flags(env: &Env, role: &str) -> Vec<String> {
    vec![
        "--cert".into(),
        env.pki.cert(role).display().to_string(),
        "--key".into(),
        env.pki.key(role).display().to_string(),
    ]
}

#[test]
fn every_tls_refusal_names_what_is_wrong() {
    let mut fleet = Fleet::start(0);
    own_pki(&fleet.env);
    fleet.http = fleet.env.client("deployer");
    let st = fleet.env.path("staging");
    tree(&st, "v1");
    let v1 = fleet.env.build(&[("mediawiki", &st)], &[]);
    fleet.serve();
    let dir = |n: &str| fleet.env.path(&format!("hosts/{n}"));
    let (good, expired, elsewhere) = (dir("good"), dir("expired"), dir("elsewhere"));
    fleet.add_host("good", &good);
    fleet.add_host_with(
        "expired",
        &expired,
        &cert_flags(&fleet.env, "agent-expired"),
    );
    fleet.add_host_with(
        "elsewhere",
        &elsewhere,
        &cert_flags(&fleet.env, "agent-elsewhere"),
    );
    // Another site's PKI: a CA nobody here trusts.
    let other = scap::pki::init(&fleet.env.path("other-pki"), &[], 30).unwrap();
    let stranger = fleet.env.path("hosts/stranger");
    let other_cert = vec![
        "--cert".to_string(),
        other.cert("agent").display().to_string(),
        "--key".into(),
        other.key("agent").display().to_string(),
    ];
    fleet.add_host_with("stranger", &stranger, &other_cert);

    // The controller reaches each and says what is wrong with the others.
    let out = fleet.run(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |i: usize| {
        let port = fleet.hosts[i].proc.port().to_string();
        text.lines()
            .find(|l| l.contains(&port))
            .unwrap_or_else(|| panic!("host {i} in {text}"))
            .to_string()
    };
    assert!(!line(0).contains("UNREACHABLE"), "{text}");
    assert!(line(1).contains("its certificate has expired"), "{text}");
    assert!(line(2).contains("not valid for the name"), "{text}");
    assert!(
        line(3).contains("not signed by the CA this command trusts"),
        "{text}"
    );

    // A plain-HTTP request to a TLS port: a 400 that says to use https.
    let port = fleet.hosts[0].proc.port();
    let r = reqwest::blocking::get(format!("http://127.0.0.1:{port}/v1/state")).unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().unwrap().contains("this port speaks HTTPS"));

    // No client certificate: reading and changing are refused by name.
    let ca = reqwest::Certificate::from_pem(&fs::read(fleet.env.pki.ca()).unwrap()).unwrap();
    let anonymous = reqwest::blocking::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let url = &fleet.hosts[0].proc.url;
    let r = anonymous
        .post(format!("{url}/v1/sync"))
        .json(&fleet.sync_body(&v1, &[&fleet.source()]))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.text().unwrap().contains("needs a client certificate"));
    // ...but health and metrics are open (over TLS).
    assert_eq!(
        anonymous
            .get(format!("{url}/metrics"))
            .send()
            .unwrap()
            .status(),
        200
    );
    // The object service wants a client certificate too.
    let r = anonymous
        .get(format!("{}/versions/{v1}.json", fleet.source()))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // A certificate from another CA does not get through the handshake.
    let mut pem = fs::read(other.cert("deployer")).unwrap();
    pem.extend(fs::read(other.key("deployer")).unwrap());
    let ca = reqwest::Certificate::from_pem(&fs::read(fleet.env.pki.ca()).unwrap()).unwrap();
    let foreign = reqwest::blocking::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .identity(reqwest::Identity::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    assert!(
        foreign
            .post(format!("{url}/v1/sync"))
            .json(&fleet.sync_body(&v1, &[&fleet.source()]))
            .send()
            .is_err_and(|e| e.to_string().contains("error sending request"))
    );
    // A certificate from the site CA that is not a deployer's: 403.
    let agent_client = fleet.env.client("agent");
    let r = agent_client
        .post(format!("{url}/v1/sync"))
        .json(&fleet.sync_body(&v1, &[&fleet.source()]))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert!(r.text().unwrap().contains("not a deployer's here"));
    // The host kept running what it ran: nothing.
    assert_eq!(fleet.current(0), None);
    // An agent whose source's certificate is from another CA: the sync
    // fails naming it.
    let foreign_source = fleet.serve_store(
        &fleet.env.store,
        &[
            "--cert",
            other.cert("server").to_str().unwrap(),
            "--key",
            other.key("server").to_str().unwrap(),
        ],
    );
    let (code, r) = fleet.post(0, "/v1/sync", fleet.sync_body(&v1, &[&foreign_source.url]));
    assert_eq!(code, 502, "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("not signed by the CA"),
        "{r}"
    );
    let (code, r) = fleet.sync_to(0, &v1);
    assert_eq!(code, 200, "{r}");
}

#[test]
fn every_signature_refusal_names_the_version_and_the_key() {
    let mut fleet = Fleet::start(1);
    let st = fleet.env.path("staging");
    tree(&st, "v1");
    let v1 = fleet.env.build(&[("mediawiki", &st)], &[]);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    tree(&st, "v2");
    let v2 = fleet.env.build(&[("mediawiki", &st)], &[]);
    fleet.serve();
    assert_eq!(fleet.sync_to(0, &v1).0, 200);
    assert_eq!(fleet.sync_to(0, &v2).0, 200);
    let sig = |v: &str| fleet.env.store.join(format!("versions/{v}.sig"));
    let refused = |v: &str, body: serde_json::Value, code: u16, want: &str| {
        let (c, r) = fleet.post(0, "/v1/sync", body);
        assert_eq!(c, code, "{want}: {r}");
        let e = r["error"].as_str().unwrap();
        assert!(e.contains(want) && e.contains(&v[..12]), "{want}: {e}");
        assert_eq!(fleet.current(0).as_deref(), Some(v2.as_str()), "{want}");
    };

    // No signature at all (none sent, none at the source).
    tree(&st, "unsigned");
    let u = fleet.env.build(&[("mediawiki", &st)], &[]);
    fs::remove_file(sig(&u)).unwrap();
    refused(
        &u,
        json!({"version": u, "sources": [fleet.source()]}),
        403,
        "is not signed",
    );
    // Signed by a key this host does not trust.
    let key = fleet.env.path("other.key");
    fleet.env.ok(&["keygen", "--out", key.to_str().unwrap()]);
    fleet.env.ok(&["sign", &u, "--key", key.to_str().unwrap()]);
    let other_id =
        String::from_utf8_lossy(&fs::read(fleet.env.path("other.key.pub")).unwrap()).to_string();
    let other_id = scap::store::signature::PublicKey::parse(other_id.trim())
        .unwrap()
        .id
        .to_string();
    let (c, r) = fleet.post(0, "/v1/sync", fleet.sync_body(&u, &[&fleet.source()]));
    assert_eq!(c, 403, "{r}");
    let e = r["error"].as_str().unwrap();
    assert!(e.contains("does not trust") && e.contains(&other_id), "{e}");
    // A signature made for another root (and none at the source: a
    // source with a good one would be taken instead).
    tree(&st, "v3");
    let v3 = fleet.env.build(&[("mediawiki", &st)], &[]);
    let mut other_root = fleet.sync_body(&v3, &[&fleet.source()]);
    other_root["signature"] = fleet.env.signature(&v2);
    let mut body = fleet.sync_body(&v3, &[&fleet.source()]);
    fs::remove_file(sig(&v3)).unwrap();
    refused(&v3, other_root, 403, "is about version");
    // An altered statement (the signature no longer verifies).
    let doc: scap::store::signature::SignedVersion =
        serde_json::from_value(body["signature"].clone()).unwrap();
    let mut statement = doc.statement().unwrap();
    statement.author = "mallory".into();
    use base64::Engine;
    body["signature"]["statement"] = json!(
        base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&statement).unwrap())
    );
    refused(&v3, body, 403, "does not verify");
    // A replayed old version: a sync never goes back in time...
    refused(
        &v1,
        fleet.sync_body(&v1, &[&fleet.source()]),
        409,
        "never goes back in time",
    );
    // ...an explicit rollback does.
    let out = fleet.run(&["rollback", "--to", &v1, "--yes"]);
    ok(&out);
    assert_eq!(fleet.current(0).as_deref(), Some(v1.as_str()));
    // The controller's own sync of an unsigned version fails, naming it.
    let out = fleet.rollout(&u, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("does not trust"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn a_key_rotation_two_keys_trusted_then_one_revoked() {
    let mut fleet = Fleet::start(0);
    let NewKey {
        key: new_key,
        public: new_pub,
        lab_id,
        trust_both,
    } = NewKey::make(&fleet.env);
    for i in 0..2 {
        let d = fleet.env.path(&format!("hosts/mw{i}"));
        fleet.add_host_with(&format!("mw{i}"), &d, &trust_both);
    }
    let st = fleet.env.path("staging");
    tree(&st, "v1");
    let v1 = fleet.env.build(&[("mediawiki", &st)], &[]);
    tree(&st, "v2");
    let v2 = fleet.env.build(
        &[("mediawiki", &st)],
        &["--sign-key", new_key.to_str().unwrap()],
    );
    fleet.serve();
    ok(&fleet.rollout(&v1, &[]));
    ok(&fleet.rollout(&v2, &[]));
    assert_eq!(fleet.on(&v2), vec![0, 1]);
    // The old key is revoked mid-way (agents restarted with the new set).
    for i in 0..2 {
        fleet.hosts[i].extra = [
            trust_both.clone(),
            vec!["--revoked-key".into(), lab_id.clone()],
        ]
        .concat();
        fleet.restart(i);
    }
    tree(&st, "v3");
    let v3 = fleet.env.build(&[("mediawiki", &st)], &[]);
    let out = fleet.rollout(&v3, &[]);
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("revoked") && said.contains(&lab_id), "{said}");
    assert_eq!(fleet.on(&v2), vec![0, 1]);
    // Re-signed with the new key, and the deploy host's `sign_key` moved
    // to it (the README's rotation: deploy orders are signed with it), it
    // goes out.
    fleet
        .env
        .ok(&["sign", &v3, "--key", new_key.to_str().unwrap()]);
    let toml = fleet.env.dir.path().join("scap.toml");
    let text = fs::read_to_string(&toml).unwrap().replace(
        &fleet.env.pki.deploy_key().display().to_string(),
        &new_key.display().to_string(),
    );
    fs::write(&toml, text).unwrap();
    ok(&fleet.rollout(&v3, &[]));
    assert_eq!(fleet.on(&v3), vec![0, 1]);
    // A rollback to a version whose only key is revoked since is
    // refused: v2 was signed by the new key alone; revoke that one.
    let new_id = scap::store::signature::PublicKey::load(&new_pub)
        .unwrap()
        .id
        .to_string();
    fleet.hosts[0].extra = [
        trust_both.clone(),
        vec!["--revoked-key".into(), new_id.clone()],
    ]
    .concat();
    fleet.restart(0);
    let (code, r) = fleet.post(0, "/v1/rollback", json!({"to": "previous"}));
    assert_eq!(code, 403, "{r}");
    let e = r["error"].as_str().unwrap();
    assert!(
        e.contains("revoked") && e.contains(&new_id) && e.contains(&v2[..12]),
        "{e}"
    );
    assert_eq!(fleet.current(0).as_deref(), Some(v3.as_str()));
}

/// A deploy through recording proxies (controller -> agent, agent ->
/// source); returns what crossed the wire.
fn capture(fleet: &mut Fleet, v: &str) -> Vec<u8> {
    let (source, to_source) = recording_proxy(&fleet.source());
    let (agent, to_agent) = recording_proxy(&fleet.hosts[0].proc.url);
    let group = fleet.env.path("proxied");
    fs::write(&group, format!("{}\n", agent.split("://").nth(1).unwrap())).unwrap();
    let out = fleet
        .env
        .cmd()
        .args(["sync", "--version", v, "--source", &source, "--hosts"])
        .arg(&group)
        .args(ungated(&[]))
        .args(fleet.transport("deployer"))
        .output()
        .unwrap();
    ok(&out);
    let mut all = to_source.lock().unwrap().clone();
    all.extend(to_agent.lock().unwrap().iter());
    all
}

#[test]
fn the_wire_shows_neither_token_nor_content_over_tls() {
    // A file whose bytes would show verbatim in a plain stream (noise does
    // not compress).
    let secret = noise(20_000, 77);
    for insecure in [true, false] {
        let mut fleet = if insecure {
            Fleet::start_insecure(1)
        } else {
            Fleet::start(1)
        };
        let st = fleet.env.path("staging");
        tree(&st, "v1");
        write(&st, "private/security-fix.php", &secret);
        let v = fleet.env.build(&[("mediawiki", &st)], &[]);
        fleet.serve();
        let wire = capture(&mut fleet, &v);
        assert!(wire.len() > secret.len(), "something crossed the wire");
        let shows_content = contains(&wire, &secret[1000..1064]);
        let shows_token = contains(&wire, TOKEN.as_bytes());
        if insecure {
            // The test can fail: in the clear, both show.
            assert!(shows_content && shows_token, "plain HTTP shows them");
        } else {
            assert!(!shows_content, "file content in the clear over TLS");
            assert!(!shows_token, "a token over TLS");
            assert!(!contains(&wire, b"HTTP/1.1"), "HTTP in the clear");
        }
        assert_eq!(
            fs::read(fleet.live(0, "mediawiki").join("private/security-fix.php")).unwrap(),
            secret
        );
    }
}
