//! Declarations that depend on the broker's version, and dead letters that survive
//! listing (docs/operations.md, "Supported RabbitMQ versions"). Only RabbitMQ 3.10 runs
//! here: the 4.x declarations are checked by unit tests of their arguments, and the
//! RabbitMQ 4 code path of the declaration runs here against 3.10.

use courier::broker::{ServerVersion, topology};

use crate::helpers::*;

fn one_account() -> ConfigSpec {
    ConfigSpec {
        accounts: "[[account]]\nid = \"acme\"\ncompanies_url = \"http://127.0.0.1:9/\"\n".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn dead_letters_survive_any_number_of_listings_shows_and_partial_replays() {
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let settings = settings(&names, &one_account());
    courier::commands::setup(&settings).await.expect("setup");
    let letters: Vec<Vec<u8>> = (0..6)
        .map(|i| {
            event(
                &format!("d{i}"),
                if i < 3 { "acme" } else { "other" },
                "company",
            )
        })
        .collect();
    broker.publish_to_queue(&names.dead(), &letters).await;
    // More listings than RabbitMQ 4's default delivery limit of 20.
    for round in 0..25 {
        let listing = courier::commands::dlq::list(&settings, 10)
            .await
            .expect("dlq list");
        assert_eq!(listing.total, 6, "listing {round}");
    }
    // Partial replays: the letters that do not match return each time.
    let filter = courier::commands::dlq::Filter {
        account: Some("nobody".into()),
        ..Default::default()
    };
    for _ in 0..3 {
        let done = courier::commands::dlq::replay(&settings, &filter, false)
            .await
            .expect("dlq replay");
        assert_eq!((done.examined, done.replayed), (6, 0));
        let shown = courier::commands::dlq::show(&settings, &Default::default())
            .await
            .expect("dlq show");
        assert_eq!(shown.examined, 6);
    }
    assert_eq!(broker.settled_depth(&names.dead()).await, 6);
}

#[tokio::test]
async fn a_dead_letter_queue_declared_before_rabbitmq_4_is_kept_and_others_still_refused() {
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let settings = settings(&names, &one_account());
    // Declared as a 3.x broker gets it: no x-delivery-limit on the dead-letter queue.
    topology::declare(
        &broker.conn,
        &settings.broker,
        &settings.retry.schedule,
        None,
    )
    .await
    .expect("3.x declaration");
    let v4 = ServerVersion::parse("4.0.0");
    // The same queues declared as for RabbitMQ 4: the dead-letter queue cannot take -1 in
    // place, and is kept as it is.
    topology::declare(&broker.conn, &settings.broker, &settings.retry.schedule, v4)
        .await
        .expect("a 3.x dead-letter queue is kept on RabbitMQ 4");
    // A dead-letter queue with another limit is refused, naming queue and argument.
    let other = Names::new();
    let other_broker = Broker::connect(&other, &["30s"]).await;
    let other_settings = self::settings(&other, &one_account());
    let dead =
        topology::queues(&other_settings.broker, &other_settings.retry.schedule, None).remove(0);
    other_broker.declare_with_limit(&dead, 5).await;
    for version in [None, v4] {
        let refused = topology::declare(
            &other_broker.conn,
            &other_settings.broker,
            &other_settings.retry.schedule,
            version,
        )
        .await
        .expect_err("a dead-letter queue with a limit of 5 is refused");
        let text = refused.to_string();
        assert!(
            text.contains(&other.dead()) && text.contains("x-delivery-limit"),
            "{version:?}: {text}"
        );
    }
}
