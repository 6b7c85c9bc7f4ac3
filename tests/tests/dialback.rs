//! Port verification (`/peervm/dialback/1`) between real nodes over loopback: the server
//! dials the asker back at the address its connection comes from, reports open and
//! closed ports, serves a peer once per interval, and refuses to dial anyone else.

use std::time::Duration;

use peervm_node::network::Role;
use peervm_node::network::dialback::{DialBackRequest, DialBackResponse, PortState};
use peervm_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_back_checks_the_askers_own_ports_once_per_interval_and_refuses_third_parties() {
    let server = start_node(unique_key(81), Role::Bootstrap, &[]).await;
    let asker = start_node(unique_key(82), Role::Provider, &server.listen_addrs).await;
    let connected = wait_until(Duration::from_secs(10), || async {
        asker.client.connected_peers().await.map(|p| p.contains(&server.peer_id)).unwrap_or(false)
    })
    .await;
    assert!(connected.is_some());

    let open = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let open_port = open.local_addr().unwrap().port();
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let request = DialBackRequest { ip: None, ports: vec![open_port, closed_port] };
    let reply = asker.client.dial_back(server.peer_id, request.clone()).await.unwrap();
    let mut expected = vec![(open_port, PortState::Open), (closed_port, PortState::Closed)];
    expected.sort_by_key(|(port, _)| *port);
    assert_eq!(reply, DialBackResponse::Result { observed_ip: "127.0.0.1".into(), ports: expected });
    let accepted = tokio::time::timeout(Duration::from_secs(1), open.accept()).await;
    assert!(accepted.is_ok(), "the open port saw the dial-back connection");

    // Once per interval.
    let again = asker.client.dial_back(server.peer_id, request).await.unwrap();
    assert!(matches!(again, DialBackResponse::Refused { .. }), "{again:?}");

    // A third party's address (another loopback IP the asker does not come from).
    let third = start_node(unique_key(83), Role::Requestor, &server.listen_addrs).await;
    wait_until(Duration::from_secs(10), || async {
        third.client.connected_peers().await.map(|p| p.contains(&server.peer_id)).unwrap_or(false)
    })
    .await
    .expect("third node connects");
    let victim = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let victim_port = victim.local_addr().unwrap().port();
    let reply = third
        .client
        .dial_back(server.peer_id, DialBackRequest { ip: Some("127.0.0.2".into()), ports: vec![victim_port] })
        .await
        .unwrap();
    match reply {
        DialBackResponse::Refused { reason } => assert!(reason.contains("refusing to dial 127.0.0.2"), "{reason}"),
        other => panic!("a dial-back to a third party was not refused: {other:?}"),
    }
    let dialed = tokio::time::timeout(Duration::from_secs(4), victim.accept()).await;
    assert!(dialed.is_err(), "the third party was dialed");

    for n in [asker, third, server] {
        n.stop().await;
    }
}
