//! Smoke test for an emulated target, run before anything else on it: spawns
//! a thread and joins it. A loader/libc mismatch under qemu-user (the cross
//! loader from /usr/aarch64-linux-gnu with the multiarch libc6:arm64) makes
//! the first `pthread_create` spin forever; CI runs this under `timeout`, so
//! that mix fails in seconds instead of hanging the agent's tests.

fn main() {
    let handle = std::thread::spawn(|| 6 * 7);
    let answer = handle.join().expect("the spawned thread ran");
    assert_eq!(answer, 42);
    println!("thread smoke: spawned and joined a thread on {}", std::env::consts::ARCH);
}
