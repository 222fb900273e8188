use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::{Ca, CaError, WorkloadKey};

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
    let (c, s) = tokio::io::duplex(16 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(
        server_config(server, policy, &["istio"]).map_err(|e| e.to_string())?,
    );
    let connector = tokio_rustls::TlsConnector::from(
        client_config(client, expect_server, &["istio"]).map_err(|e| e.to_string())?,
    );
    let server_side = tokio::spawn(async move {
        let mut tls = acceptor.accept(s).await.map_err(|e| e.to_string())?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first().cloned())
            .and_then(|c| peer_spiffe_id(&c));
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(&buf).await.map_err(|e| e.to_string())?;
        peer.ok_or_else(|| "no client identity".to_string())
    });
    let name =
        ServerName::try_from("outbound_.9080_._.backend.demo.svc.cluster.local").expect("name");
    let client_side = async {
        let mut tls = connector
            .connect(name, c)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    };
    let client_result = client_side.await;
    let server_result = server_side.await.map_err(|e| e.to_string())?;
    client_result?;
    server_result
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
