//! The Argon2id bound for logins: password verifications per second with the parameters
//! Portcullis uses, on N threads at once (default 1). Prints `RESULT <hashes/s>`.
//! `cargo run --release -p portcullis-core --example argon2_rate -- 2`

use std::time::Instant;

use portcullis_core::crypto::password::{hash_password, verify_password};
use secrecy::SecretString;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let threads: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(1).max(1);
    let p = SecretString::from("correct horse battery staple");
    let phc = hash_password(&p)?;
    let per_thread = 60;
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..per_thread {
                    let _ = verify_password(&p, &phc);
                }
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    let rate = (threads * per_thread) as f64 / secs;
    println!("RESULT {rate:.1} ({threads} threads, {:.2} ms per verification)", 1e3 * secs / per_thread as f64);
    Ok(())
}
