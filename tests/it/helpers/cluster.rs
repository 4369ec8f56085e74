//! A three-node RabbitMQ cluster of the test's own: three private nodes (node.rs) joined
//! into one cluster, stopped and removed when dropped. deploy/local/cluster.sh does the
//! same by hand (docs/scaling.md).

use std::time::Duration;

use super::{PrivateNode, ports_of_connections_named};

pub struct Cluster {
    pub nodes: Vec<PrivateNode>,
    stopped: Vec<bool>,
}

impl Cluster {
    /// Boots three nodes and joins the second and third to the first (15-30 s here).
    pub async fn start() -> Self {
        let nodes: Vec<PrivateNode> = (0..3).map(|_| PrivateNode::prepare()).collect();
        futures_util::future::join_all(nodes.iter().map(PrivateNode::boot)).await;
        for node in &nodes[1..] {
            node.join(&nodes[0]).await;
        }
        assert!(
            nodes[0]
                .ctl(&["await_online_nodes", "3", "--timeout", "120"])
                .await,
            "the cluster did not form"
        );
        Self {
            stopped: vec![false; nodes.len()],
            nodes,
        }
    }

    /// The nodes' URLs, node `first` first and the others after it in turn: a
    /// `broker.url` list that makes a worker connect to node `first`.
    pub fn urls_from(&self, first: usize) -> Vec<String> {
        (0..self.nodes.len())
            .map(|i| self.nodes[(first + i) % self.nodes.len()].url())
            .collect()
    }

    /// A node still running, to ask about the cluster.
    fn running(&self) -> &PrivateNode {
        let i = self
            .stopped
            .iter()
            .position(|s| !s)
            .expect("a running node");
        &self.nodes[i]
    }

    /// The index of the node that leads the quorum queue `queue`, once the cluster has
    /// one (after a node loss the members elect a new leader).
    pub async fn leader(&self, queue: &str, timeout: Duration) -> Option<usize> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let leader = self.running().queue_info(queue, "leader").await;
            let found = leader.and_then(|name| {
                self.nodes
                    .iter()
                    .position(|n| n.name == name)
                    .filter(|&i| !self.stopped[i])
            });
            if found.is_some() || tokio::time::Instant::now() >= deadline {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The members of the quorum queue `queue`, as rabbitmqctl prints them.
    pub async fn members(&self, queue: &str) -> String {
        self.running()
            .queue_info(queue, "members")
            .await
            .unwrap_or_default()
    }

    /// Messages in `queue` (ready and unacknowledged).
    pub async fn messages(&self, queue: &str) -> Option<u64> {
        self.queue_info(queue, "messages").await?.parse().ok()
    }

    /// A `rabbitmqctl list_queues` column of `queue`, asked of a running node.
    pub async fn queue_info(&self, queue: &str, column: &str) -> Option<String> {
        self.running().queue_info(queue, column).await
    }

    /// The indexes of the nodes that hold a connection named `name`, in order.
    pub async fn nodes_with_connection(&self, name: &str) -> Vec<usize> {
        let ports = ports_of_connections_named(&self.running().name, name).await;
        let mut found: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| ports.contains(&self.nodes[i].port))
            .collect();
        found.dedup();
        found
    }

    /// What each running node's at-least-once dead-letter workers hold: per source queue,
    /// the messages forwarded but not yet confirmed by their target, with the targets
    /// still unconfirmed and how often each was sent. For a test's failure output.
    pub async fn dead_letter_workers(&self) -> String {
        // rabbit_fifo_dlx_worker's #state{} and #pending{} records as of RabbitMQ 3.10.
        const EVAL: &str = "[begin S = sys:get_state(P), Ps = maps:values(element(8, S)), \
            {element(4, element(2, S)), length(Ps), \
             lists:usort([{[element(4, Q) || Q <- element(5, X)], element(8, X)} || X <- Ps])} \
            end || {_, P, _, _} <- supervisor:which_children(rabbit_fifo_dlx_sup)].";
        let mut out = String::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if !self.stopped[i] {
                let held = super::rabbitmqctl(Some(&node.name), &["eval", EVAL]).await;
                out.push_str(&format!("node {i}: {}\n", held.trim()));
            }
        }
        out
    }

    /// Starts the stopped node `i` again; it rejoins the cluster with its data.
    pub async fn restart(&mut self, i: usize) {
        self.nodes[i].boot().await;
        self.stopped[i] = false;
    }

    /// Queues of `queues` that hold messages neither ready nor unacknowledged: dead
    /// letters that a quorum queue's at-least-once dead-letter worker has not forwarded
    /// (docs/scaling.md, "Retries held after a node loss").
    pub async fn held_dead_letters(&self, queues: &[String]) -> Vec<(String, u64)> {
        // One listing, so that the three counts are of the same moment.
        let listing = super::rabbitmqctl(
            Some(&self.running().name),
            &[
                "list_queues",
                "-q",
                "--no-table-headers",
                "name",
                "messages",
                "messages_ready",
                "messages_unacknowledged",
            ],
        )
        .await;
        listing
            .lines()
            .filter_map(|line| {
                let mut fields = line.split('\t');
                let name = fields.next()?;
                let counts: Vec<u64> = fields.filter_map(|v| v.trim().parse().ok()).collect();
                let [messages, ready, unacked] = counts[..] else {
                    return None;
                };
                (queues.iter().any(|q| q == name) && messages > ready + unacked)
                    .then(|| (name.to_owned(), messages - ready - unacked))
            })
            .collect()
    }

    /// Stops node `i`; the others keep the cluster (a majority of every queue's members).
    pub async fn stop(&mut self, i: usize) {
        self.nodes[i].stop().await;
        self.stopped[i] = true;
    }
}
