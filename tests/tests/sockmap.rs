//! The kernel side: the embedded eBPF object loads, attaches, and splices a TCP pair kernel to kernel.

use spoke::datapath::sockmap::Sockmap;
use spoke_tests::privileged;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (client.unwrap(), accepted.unwrap().0)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| u8::try_from((i * 31 + usize::from(seed)) % 251).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verdict_program_splices_a_pair_in_the_kernel() {
    if !privileged("sockmap test") {
        return;
    }
    let sockmap = Sockmap::load().expect("load and attach the eBPF programs");
    // client <-> (p1 ~kernel~ p2) <-> server; nothing in user space reads p1 or p2.
    let (mut client, p1) = pair().await;
    let (p2, mut server) = pair().await;
    let spliced = sockmap.pair(&p1, &p2).expect("insert the pair");
    let len = 4 << 20;
    let (up, down) = (pattern(1, len), pattern(2, len));
    let mut got_up = vec![0u8; len];
    let mut got_down = vec![0u8; len];
    let (c, s) = (client.split(), server.split());
    let ((mut cr, mut cw), (mut sr, mut sw)) = (c, s);
    let wait = std::time::Duration::from_secs(30);
    tokio::time::timeout(wait, async {
        tokio::try_join!(
            cw.write_all(&up),
            sw.write_all(&down),
            sr.read_exact(&mut got_up),
            cr.read_exact(&mut got_down)
        )
    })
    .await
    .expect("spliced bytes arrive in time")
    .expect("spliced I/O");
    assert!(got_up == up, "client → server bytes intact");
    assert!(got_down == down, "server → client bytes intact");
    assert_eq!(sockmap.redirected(spliced), (len as u64, len as u64), "every byte went through the program");
    sockmap.unpair(spliced);
    drop((p1, p2));
}
