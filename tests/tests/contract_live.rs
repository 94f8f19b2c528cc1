//! Contract checks that need a real server: our slot function agrees with `CLUSTER KEYSLOT`.

use harness::redis::{RedisConfig, RedisServer};
use rand::{Rng, SeedableRng};

#[test]
fn key_slot_agrees_with_cluster_keyslot_for_random_keys() {
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let server = RedisServer::start(RedisConfig {
        cluster_enabled: true,
        ..Default::default()
    })
    .unwrap();
    let mut conn = server.conn();
    let mut pipe = redis::pipe();
    let mut keys = Vec::new();
    for i in 0..2000 {
        let len = rng.random_range(0..40);
        let mut key: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        // Make hash tags common: braces at random places.
        if i % 3 == 0 && len > 4 {
            key[1] = b'{';
            key[len - 2] = b'}';
        }
        pipe.cmd("CLUSTER").arg("KEYSLOT").arg(&key);
        keys.push(key);
    }
    let slots: Vec<u16> = pipe.query(&mut conn).unwrap();
    for (key, slot) in keys.iter().zip(slots) {
        assert_eq!(
            proto::key_slot(key).get(),
            slot,
            "key {key:?} (seed {seed})"
        );
    }
}
