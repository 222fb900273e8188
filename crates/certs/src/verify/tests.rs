use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::{Ca, CaError, Peer, WorkloadKey};

impl Identity {
    /// Tests hand one identity to several cells; the real path makes each once.
    fn clone_for_test(&self) -> Self {
        Self {
            id: self.id.clone(),
            serial: self.serial.clone(),
            not_before: self.not_before,
            not_after: self.not_after,
            roots_pem: self.roots_pem.clone(),
            certified: self.certified.clone(),
            roots: self.roots.clone(),
            client_verifier: self.client_verifier.clone(),
        }
    }
}

const TD: &str = "cluster.local";

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new(TD, "demo", sa)
}

fn issue(ca: &Ca, who: &SpiffeId, now: SystemTime, ttl: Duration) -> Identity {
    let key = WorkloadKey::generate().expect("key");
    let chain = ca
        .sign_csr(&key.csr_pem(who).expect("csr"), who, now, ttl)
        .expect("signed");
    Identity::new(who.clone(), &key, &chain, ca.root_pem()).expect("identity")
}

fn ca() -> Ca {
    Ca::self_signed(TD, SystemTime::now(), crate::DEFAULT_ROOT_TTL).expect("ca")
}

/// Runs one mTLS handshake in memory; returns the client identity the server saw, or the error.
async fn handshake(
    client: &Identity,
    expect_server: SpiffeId,
    server: &Identity,
    policy: PeerPolicy,
) -> Result<SpiffeId, String> {
    let server_cell = IdentityCell::new(server.clone_for_test());
    let client_cell = IdentityCell::new(client.clone_for_test());
    let server_tls = server_config(&server_cell, policy, ClientAuth::Required, &["istio"])
        .map_err(|e| e.to_string())?;
    let client_tls = client_config(
        &client_cell,
        PeerPolicy::Only(vec![expect_server]),
        &["istio"],
    )
    .map_err(|e| e.to_string())?;
    exchange(&client_tls, &server_tls)
        .await
        .and_then(|(peer, _)| peer.id.ok_or_else(|| "no client identity".to_string()))
}

/// One in-memory connection: the server echoes four bytes. Returns what each side saw of the other.
async fn exchange(client: &ClientTls, server: &ServerTls) -> Result<(Peer, Peer), String> {
    let (c, s) = tokio::io::duplex(16 * 1024);
    let server = server.clone();
    let server_side = tokio::spawn(async move {
        let (mut tls, peer) = crate::accept(&server, s).await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(&buf).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    });
    let client_side = async {
        let (mut tls, peer) = crate::connect(
            client,
            "outbound_.9080_._.backend.demo.svc.cluster.local",
            c,
        )
        .await
        .map_err(|e| e.to_string())?;
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    };
    let client_result = client_side.await;
    let server_result = server_side.await.map_err(|e| e.to_string())?;
    let server_seen = client_result?;
    Ok((server_result?, server_seen))
}

#[tokio::test]
async fn workloads_of_one_ca_authenticate_each_other_by_spiffe_id() {
    let ca = ca();
    let (client, server) = (
        issue(
            &ca,
            &id("frontend"),
            SystemTime::now(),
            crate::DEFAULT_WORKLOAD_TTL,
        ),
        issue(
            &ca,
            &id("backend"),
            SystemTime::now(),
            crate::DEFAULT_WORKLOAD_TTL,
        ),
    );
    let seen = handshake(
        &client,
        id("backend"),
        &server,
        PeerPolicy::TrustDomain(TD.into()),
    )
    .await;
    assert_eq!(seen, Ok(id("frontend")));
    assert!(!client.serial.is_empty());
    assert!(client.not_after > SystemTime::now() + Duration::from_secs(23 * 3600));
}

#[tokio::test]
async fn peers_that_must_be_refused_are() {
    let ca = ca();
    let now = SystemTime::now();
    let good = issue(&ca, &id("frontend"), now, crate::DEFAULT_WORKLOAD_TTL);
    let server = issue(&ca, &id("backend"), now, crate::DEFAULT_WORKLOAD_TTL);
    let other_ca = issue(
        &Ca::self_signed(TD, now, crate::DEFAULT_ROOT_TTL).expect("ca"),
        &id("frontend"),
        now,
        crate::DEFAULT_WORKLOAD_TTL,
    );
    let expired = issue(
        &ca,
        &id("frontend"),
        now - Duration::from_secs(3 * 24 * 3600),
        Duration::from_secs(3600),
    );
    let all = PeerPolicy::TrustDomain(TD.into());
    for (name, client, expect, policy) in [
        (
            "client certificate from another CA",
            &other_ca,
            id("backend"),
            all.clone(),
        ),
        (
            "expired client certificate",
            &expired,
            id("backend"),
            all.clone(),
        ),
        (
            "client identity outside the policy",
            &good,
            id("backend"),
            PeerPolicy::Only(vec![id("admin")]),
        ),
        (
            "server is not who the client expects",
            &good,
            id("payments"),
            all.clone(),
        ),
        (
            "client in another trust domain policy",
            &good,
            id("backend"),
            PeerPolicy::TrustDomain("other.domain".into()),
        ),
    ] {
        assert!(
            handshake(client, expect, &server, policy).await.is_err(),
            "{name} was accepted"
        );
    }
}

#[test]
fn the_ca_refuses_a_csr_for_an_identity_the_caller_does_not_hold() {
    let ca = ca();
    let key = WorkloadKey::generate().expect("key");
    let csr = key.csr_pem(&id("admin")).expect("csr");
    match ca.sign_csr(
        &csr,
        &id("frontend"),
        SystemTime::now(),
        crate::DEFAULT_WORKLOAD_TTL,
    ) {
        Err(CaError::WrongIdentity { requested, caller }) => {
            assert_eq!(
                (requested.as_str(), caller),
                (
                    "spiffe://cluster.local/ns/demo/sa/admin",
                    "spiffe://cluster.local/ns/demo/sa/frontend".to_string()
                )
            );
        }
        other => panic!("expected WrongIdentity, got {other:?}"),
    }
}

#[tokio::test]
async fn a_user_ca_in_istios_cacerts_layout_issues_through_its_intermediate() {
    // Build root -> intermediate as a user would, and lay them out as Istio's cacerts secret.
    let now = SystemTime::now();
    let root_key = rcgen::KeyPair::generate().expect("key");
    let mut root_params = rcgen::CertificateParams::default();
    root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "user root");
    root_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let root_cert = root_params.self_signed(&root_key).expect("root");
    let root_issuer = rcgen::Issuer::new(root_params, root_key);
    let int_key = rcgen::KeyPair::generate().expect("key");
    let mut int_params = rcgen::CertificateParams::default();
    int_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    int_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "user intermediate");
    int_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let int_cert = int_params
        .signed_by(&int_key, &root_issuer)
        .expect("intermediate");
    let dir = std::env::temp_dir().join(format!("weft-cacerts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("ca-cert.pem"), int_cert.pem()).expect("write");
    std::fs::write(dir.join("ca-key.pem"), int_key.serialize_pem()).expect("write");
    std::fs::write(dir.join("root-cert.pem"), root_cert.pem()).expect("write");
    std::fs::write(
        dir.join("cert-chain.pem"),
        format!("{}{}", int_cert.pem(), root_cert.pem()),
    )
    .expect("write");
    let ca = Ca::from_cacerts(&dir).expect("loads");
    let _ = std::fs::remove_dir_all(&dir);

    let key = WorkloadKey::generate().expect("key");
    let chain = ca
        .sign_csr(
            &key.csr_pem(&id("frontend")).expect("csr"),
            &id("frontend"),
            now,
            crate::DEFAULT_WORKLOAD_TTL,
        )
        .expect("signed");
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    let client = Identity::new(id("frontend"), &key, &chain, ca.root_pem()).expect("identity");
    let server = issue(&ca, &id("backend"), now, crate::DEFAULT_WORKLOAD_TTL);
    assert_eq!(
        handshake(
            &client,
            id("backend"),
            &server,
            PeerPolicy::TrustDomain(TD.into())
        )
        .await,
        Ok(id("frontend"))
    );
}

#[tokio::test]
async fn rotation_swaps_the_certificate_under_a_config_built_once() {
    let ca = ca();
    let now = SystemTime::now();
    let client_cell = IdentityCell::new(issue(
        &ca,
        &id("frontend"),
        now,
        crate::DEFAULT_WORKLOAD_TTL,
    ));
    let server_cell =
        IdentityCell::new(issue(&ca, &id("backend"), now, crate::DEFAULT_WORKLOAD_TTL));
    let all = PeerPolicy::TrustDomain(TD.into());
    let server_tls =
        server_config(&server_cell, all.clone(), ClientAuth::Required, &[]).expect("server");
    let client_tls = client_config(&client_cell, all, &[]).expect("client");
    let (client_seen, server_seen) = exchange(&client_tls, &server_tls).await.expect("first");
    let first = (client_seen.serial.clone(), server_seen.serial.clone());
    assert_eq!(
        first.1.as_deref(),
        Some(server_cell.current().serial.as_str())
    );

    client_cell.replace(issue(
        &ca,
        &id("frontend"),
        now,
        crate::DEFAULT_WORKLOAD_TTL,
    ));
    server_cell.replace(issue(&ca, &id("backend"), now, crate::DEFAULT_WORKLOAD_TTL));
    let (client_seen, server_seen) = exchange(&client_tls, &server_tls).await.expect("after");
    assert_ne!(
        client_seen.serial, first.0,
        "the server saw the client's new certificate"
    );
    assert_ne!(
        server_seen.serial, first.1,
        "the client saw the server's new certificate"
    );
    assert_eq!(client_seen.id, Some(id("frontend")));
}

#[tokio::test]
async fn optional_client_auth_admits_a_client_without_a_certificate() {
    let ca = ca();
    let server_cell = IdentityCell::new(issue(
        &ca,
        &id("istiod"),
        SystemTime::now(),
        crate::DEFAULT_WORKLOAD_TTL,
    ));
    let all = PeerPolicy::TrustDomain(TD.into());
    let expect = PeerPolicy::Only(vec![id("istiod")]);
    let anonymous = anonymous_client_config(ca.root_pem(), expect.clone(), &[]).expect("client");
    let optional =
        server_config(&server_cell, all.clone(), ClientAuth::Optional, &[]).expect("server");
    let (seen, _) = exchange(&anonymous, &optional).await.expect("admitted");
    assert_eq!(seen.id, None);
    let required = server_config(&server_cell, all, ClientAuth::Required, &[]).expect("server");
    assert!(exchange(&anonymous, &required).await.is_err());
    let wrong = anonymous_client_config(ca.root_pem(), PeerPolicy::Only(vec![id("x")]), &[])
        .expect("client");
    assert!(
        exchange(&wrong, &optional).await.is_err(),
        "wrong server identity"
    );
}

#[test]
fn a_created_ca_is_loaded_again_from_its_directory() {
    let dir = std::env::temp_dir().join(format!("weft-ca-persist-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let first = Ca::load_or_create(&dir, TD, SystemTime::now()).expect("created");
    let again = Ca::load_or_create(&dir, TD, SystemTime::now()).expect("loaded");
    assert_eq!(first.root_pem(), again.root_pem());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("ca-key.pem"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the key is private to its owner");
    let leaf = issue(
        &again,
        &id("frontend"),
        SystemTime::now(),
        crate::DEFAULT_WORKLOAD_TTL,
    );
    assert_eq!(leaf.roots_pem, first.root_pem());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Proxies check the control plane by DNS name; only the CA's own issue path puts one in, so a
/// workload certificate for the control plane's SPIFFE id is refused. A CSR's subject is never copied.
#[tokio::test]
async fn the_control_plane_is_known_by_its_dns_name_and_workloads_cannot_claim_it() {
    let ca = ca();
    let istiod = SpiffeId::new(TD, "istio-system", "istiod");
    let name = "istiod.istio-system.svc";
    let control_plane = ca
        .issue_with_dns(
            &istiod,
            &[name.to_string()],
            SystemTime::now(),
            Duration::from_secs(3600),
        )
        .expect("issued");
    let impostor = issue(&ca, &istiod, SystemTime::now(), Duration::from_secs(3600));
    let client = issue(
        &ca,
        &id("web"),
        SystemTime::now(),
        Duration::from_secs(3600),
    );
    let client_cell = IdentityCell::new(client);
    let to_control_plane = client_config(&client_cell, PeerPolicy::DnsName(name.into()), &["h2"])
        .expect("client config");
    for (who, server, ok) in [
        ("weftd", control_plane, true),
        ("impostor", impostor, false),
    ] {
        let server_tls = server_config(
            &IdentityCell::new(server),
            PeerPolicy::TrustDomain(TD.into()),
            ClientAuth::Optional,
            &["h2"],
        )
        .expect("server config");
        let result = exchange(&to_control_plane, &server_tls).await;
        assert_eq!(result.is_ok(), ok, "{who}: {result:?}");
    }

    // A CSR with a subject of its own choosing gets none.
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.subject_alt_names = vec![rcgen::SanType::URI(
        id("web").to_string().as_str().try_into().expect("uri"),
    )];
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "admin");
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:masters");
    let csr = params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    let chain = ca
        .sign_csr(
            &csr,
            &id("web"),
            SystemTime::now(),
            Duration::from_secs(3600),
        )
        .expect("signed");
    let (_, pem) = x509_parser::pem::parse_x509_pem(chain[0].as_bytes()).expect("pem");
    let cert = pem.parse_x509().expect("cert");
    assert_eq!(
        cert.subject().iter_attributes().count(),
        0,
        "{}",
        cert.subject()
    );
}
