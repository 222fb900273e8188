//! Out of descriptors, an accept loop waits instead of spinning, and recovers when they return. Its own
//! test binary, because it lowers the process's descriptor limit.

use std::{net::SocketAddr, time::Duration};

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use weft_drain::Acceptor;

#[tokio::test(flavor = "current_thread")]
async fn emfile_backs_off_and_recovers() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let mut acceptor = Acceptor::new(listener, "test");
    // The client's socket exists before the table fills; its connection then waits in the backlog.
    let client =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, 128, hard).expect("lower the limit");
    let mut hog = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        hog.push(f);
    }
    client.connect(&addr.into()).expect("connect");
    // For a while accept can only fail; bounded by a deadline, it must not have spun.
    let starved = tokio::time::timeout(Duration::from_millis(300), acceptor.accept()).await;
    assert!(starved.is_err(), "no descriptor was free to accept with");
    let failures = acceptor.failures();
    assert!(
        (1..=20).contains(&failures),
        "accept retried {failures} times in 300 ms; it must back off"
    );
    drop(hog);
    let accepted = tokio::time::timeout(Duration::from_secs(5), acceptor.accept()).await;
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).expect("restore the limit");
    assert!(
        accepted.is_ok(),
        "the backlogged connection is accepted once descriptors return"
    );
}
