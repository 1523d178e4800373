//! The command line, as clap derive types. Values are parsed and validated here
//! (money, times), so malformed input is a usage error (exit code 2).

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

use crate::output::Format;
use crate::parse::{
    budget_arg, concurrency_arg, expiry_arg, instant_arg, rpm_arg, time_arg, tpm_arg, usd_arg, weight_arg,
};

const GLOBAL: &str = "Global options";

/// Operate a relay deployment through its control plane.
#[derive(Debug, Parser)]
#[command(name = "relayctl", version, about, propagate_version = true)]
pub struct Cli {
    /// Control-plane admin endpoint (`host:port` means `http://host:port`).
    #[arg(long, global = true, help_heading = GLOBAL, env = "RELAY_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,

    /// Admin token (prefer --token-file or the environment: arguments are visible to other users).
    #[arg(long, global = true, help_heading = GLOBAL, env = "RELAY_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Read the admin token from this file (surrounding whitespace is trimmed); wins over --token.
    #[arg(long, global = true, help_heading = GLOBAL, value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// CA (PEM) to verify an https:// control plane with (default: the Mozilla roots).
    #[arg(long, global = true, help_heading = GLOBAL, env = "RELAY_CA_FILE", value_name = "PATH")]
    pub ca_file: Option<PathBuf>,

    /// Output format.
    #[arg(short = 'o', long = "output", id = "format", value_name = "FORMAT", global = true, help_heading = GLOBAL, value_enum, default_value_t = Format::Table)]
    pub output: Format,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Upstream accounts (Anthropic API keys, Claude OAuth, compatible endpoints).
    #[command(subcommand)]
    Account(AccountCmd),
    /// Client API keys.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Groups of accounts that keys are routed to.
    #[command(subcommand)]
    Group(GroupCmd),
    /// Model prices (USD per million tokens).
    #[command(subcommand)]
    Pricing(PricingCmd),
    /// Operator-tunable settings.
    #[command(subcommand)]
    Settings(SettingsCmd),
    /// Data planes and the config version each has applied (also `proxies`).
    #[command(subcommand, name = "data-planes", alias = "proxies", alias = "dp")]
    Proxies(ProxiesCmd),
    /// The audit log of admin changes.
    Audit(AuditArgs),
    /// Usage and cost.
    Usage(UsageArgs),
    /// The request log: every client request with its attempts, timings, tokens and cost (also
    /// `request`, `req`).
    #[command(subcommand, alias = "request", alias = "req")]
    Requests(RequestsCmd),
    /// Capture rules: record chosen requests in full (bodies, headers masked, stream timings).
    #[command(subcommand)]
    Capture(CaptureCmd),
    /// Tokens for the control plane: admin, read-only and data-plane tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// One screen: config version, data planes and their lag, accounts by state, the last hour,
    /// and which control-plane replica leads the singleton jobs (mechanism, since when, term).
    Status,
    /// Webhook notifications (`notify.*` settings).
    #[command(subcommand)]
    Notify(NotifyCmd),
    /// The control plane's current config version (`epoch:revision`).
    Version,
    /// Print a shell completion script (e.g. `relayctl completions bash > /etc/bash_completion.d/relayctl`).
    Completions {
        /// The shell to complete in.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum NotifyCmd {
    /// The newest notifications and their delivery (pending, sent, failed; attempts, last error).
    #[command(alias = "ls")]
    List {
        /// How many, newest first (at most 1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Send a test notification through the configured webhook now and print the receiver's HTTP
    /// status (fails unless it answers 2xx).
    Test,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccountKindArg {
    AnthropicApiKey,
    ClaudeOauth,
    AnthropicCompatible,
}

/// Where a secret comes from: never the command line itself.
#[derive(Debug, Args)]
pub struct SecretSource {
    /// Read the upstream credential from standard input.
    #[arg(long, conflicts_with = "secret_file")]
    pub secret_stdin: bool,
    /// Read the upstream credential from a file.
    #[arg(long, value_name = "PATH")]
    pub secret_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum AccountCmd {
    /// Add an account; the credential is read from stdin or a file, or Claude Code's credentials file
    /// for a claude-oauth account (also `add`).
    #[command(alias = "add", group(ArgGroup::new("secret").required(true).args(["secret_stdin", "secret_file", "credentials_file"])))]
    Create(AccountAdd),
    /// Log in to a Claude subscription (OAuth with PKCE) and add it as a claude-oauth account: prints a
    /// URL to open and approve, then reads the code the page shows (CODE#STATE) from stdin. The PKCE
    /// verifier never leaves this process; the tokens go to the control plane, encrypted at rest.
    Login(AccountLogin),
    /// List accounts.
    #[command(alias = "ls")]
    List,
    /// Show one account.
    Show {
        /// The account's name or id.
        account: String,
    },
    /// Change an account; only the given fields change.
    Update(AccountUpdate),
    /// Stop routing to an account.
    Disable {
        /// The account's name or id.
        account: String,
    },
    /// Route to an account again (also clears its health states).
    Enable {
        /// The account's name or id.
        account: String,
    },
    /// Clear an account's health states (rate limited, unauthorized, blocked, ...).
    Reset {
        /// The account's name or id.
        account: String,
    },
    /// Probe accounts now with a call that costs no tokens, print each verdict (ok, unauthorized,
    /// rate limited until, unreachable, ...) and mark the accounts accordingly.
    #[command(group(ArgGroup::new("which").required(true).args(["account", "all"])))]
    Check {
        /// The account's name or id.
        account: Option<String>,
        /// Every account.
        #[arg(long)]
        all: bool,
    },
    /// Delete an account (also `delete`, `remove`); its usage keeps its name in reports.
    #[command(aliases = ["delete", "remove"])]
    Rm {
        /// The account's name or id.
        account: String,
    },
}

#[derive(Debug, Args)]
pub struct AccountAdd {
    /// A name for the account (letters, digits, '-', '_', '.').
    pub name: String,
    /// What the credential is: an Anthropic API key, a Claude subscription (OAuth) token, or the key
    /// of an Anthropic-compatible endpoint (needs --base-url).
    #[arg(long, value_enum)]
    pub kind: AccountKindArg,
    /// Upstream base URL (default: https://api.anthropic.com).
    #[arg(long, value_name = "URL")]
    pub base_url: Option<String>,
    #[command(flatten)]
    pub secret: SecretSource,
    /// Lower is tried first.
    #[arg(long, allow_negative_numbers = true)]
    pub priority: Option<i32>,
    /// Traffic share within a priority tier, 1..=10000 (default 1; 0 is refused: use `account disable`).
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = weight_arg)]
    pub weight: Option<u32>,
    /// Group membership (repeatable or comma-separated; default: "default").
    #[arg(long = "group", value_name = "GROUP", value_delimiter = ',')]
    pub groups: Vec<String>,
    /// Concurrent requests allowed on this account (0 = unlimited).
    #[arg(long)]
    pub max_concurrency: Option<u32>,
    /// Outbound proxy: http:// (CONNECT), socks5:// or socks5h:// (names resolved by the proxy).
    #[arg(long, value_name = "URL", conflicts_with = "proxy_url_file")]
    pub proxy_url: Option<String>,
    /// Read the proxy URL from this file (for one with a password in it).
    #[arg(long, value_name = "PATH")]
    pub proxy_url_file: Option<PathBuf>,
    /// OAuth accounts: read the refresh token from this file.
    #[arg(long, value_name = "PATH")]
    pub refresh_token_file: Option<PathBuf>,
    /// OAuth accounts: when the access token expires (RFC 3339).
    #[arg(long, value_name = "RFC3339", value_parser = instant_arg)]
    pub expires: Option<i64>,
    /// claude-oauth accounts: import Claude Code's credentials file (`~/.claude/.credentials.json`,
    /// written by `claude login`): access and refresh tokens, expiry, scopes, subscription type.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["refresh_token_file", "expires"])]
    pub credentials_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct AccountLogin {
    /// A name for the account (letters, digits, '-', '_', '.').
    pub name: String,
    /// Upstream base URL (default: https://api.anthropic.com).
    #[arg(long, value_name = "URL")]
    pub base_url: Option<String>,
    /// Lower is tried first.
    #[arg(long, allow_negative_numbers = true)]
    pub priority: Option<i32>,
    /// Traffic share within a priority tier, 1..=10000 (default 1; 0 is refused: use `account disable`).
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = weight_arg)]
    pub weight: Option<u32>,
    /// Group membership (repeatable or comma-separated; default: "default").
    #[arg(long = "group", value_name = "GROUP", value_delimiter = ',')]
    pub groups: Vec<String>,
    /// Concurrent requests allowed on this account (0 = unlimited).
    #[arg(long)]
    pub max_concurrency: Option<u32>,
    /// Outbound proxy, for the token exchange and then the account's traffic.
    #[arg(long, value_name = "URL", conflicts_with = "proxy_url_file")]
    pub proxy_url: Option<String>,
    /// Read the proxy URL from this file (for one with a password in it).
    #[arg(long, value_name = "PATH")]
    pub proxy_url_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct AccountUpdate {
    /// The account's name or id.
    pub account: String,
    /// Rename the account.
    #[arg(long)]
    pub name: Option<String>,
    /// New upstream base URL (a trailing /v1 is dropped: relay adds the API path itself).
    #[arg(long, value_name = "URL")]
    pub base_url: Option<String>,
    #[command(flatten)]
    pub secret: SecretSource,
    /// New priority: lower is tried first.
    #[arg(long, allow_negative_numbers = true)]
    pub priority: Option<i32>,
    /// New traffic share within its priority tier, 1..=10000 (0 is refused: use `account disable`).
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = weight_arg)]
    pub weight: Option<u32>,
    /// Replace the group memberships (repeatable or comma-separated).
    #[arg(long = "group", value_name = "GROUP", value_delimiter = ',')]
    pub groups: Vec<String>,
    /// Concurrent requests allowed on this account (0 = unlimited).
    #[arg(long)]
    pub max_concurrency: Option<u32>,
    /// Outbound proxy; "" for a direct connection.
    #[arg(long, value_name = "URL", conflicts_with = "proxy_url_file")]
    pub proxy_url: Option<String>,
    /// Read the proxy URL from this file (for one with a password in it).
    #[arg(long, value_name = "PATH")]
    pub proxy_url_file: Option<PathBuf>,
    /// OAuth accounts: read a new refresh token from this file.
    #[arg(long, value_name = "PATH")]
    pub refresh_token_file: Option<PathBuf>,
    /// OAuth accounts: when the access token expires (RFC 3339).
    #[arg(long, value_name = "RFC3339", value_parser = instant_arg)]
    pub expires: Option<i64>,
    /// Send the stored credential of an Anthropic API-key or OAuth account to
    /// the new host of --base-url without giving it again.
    #[arg(long)]
    pub allow_credential_to_new_host: bool,
}

/// Limits of an API key, or of a group (the total across its keys). Enforced fleet-wide by the
/// data planes; 0 clears a limit (unlimited). Negative values are refused here, with what to type.
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// Requests per minute (0 = unlimited).
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = rpm_arg)]
    pub rpm: Option<u32>,
    /// Tokens per minute: input, output and cache writes (0 = unlimited).
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = tpm_arg)]
    pub tpm: Option<u64>,
    /// Requests in flight at once (0 = unlimited).
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = concurrency_arg)]
    pub concurrency: Option<u32>,
    /// Budget per calendar day in USD, e.g. 25 or 12.50 (0 = none; the day is in the
    /// `limits.timezone` setting).
    #[arg(long, value_name = "USD", allow_negative_numbers = true, value_parser = budget_arg)]
    pub daily_budget: Option<u64>,
    /// Budget per calendar month in USD (0 = none).
    #[arg(long, value_name = "USD", allow_negative_numbers = true, value_parser = budget_arg)]
    pub monthly_budget: Option<u64>,
}

impl LimitArgs {
    pub fn any(&self) -> bool {
        self.rpm.is_some()
            || self.tpm.is_some()
            || self.concurrency.is_some()
            || self.daily_budget.is_some()
            || self.monthly_budget.is_some()
    }
}

#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Create an API key; the key is printed this once (also `add`).
    #[command(alias = "add")]
    Create(KeyCreate),
    /// List API keys.
    #[command(alias = "ls")]
    List,
    /// Show one API key (never its secret): its limits, its group's, and the budgets spent today
    /// and this month.
    Show {
        /// The key's name or id.
        key: String,
    },
    /// Revoke an API key (final; it stays listed as revoked, with its usage) (also `rm`, `delete`).
    #[command(aliases = ["rm", "delete", "remove"])]
    Revoke {
        /// The key's name or id.
        key: String,
    },
    /// Change an API key; only the given fields change.
    Update(KeyUpdate),
}

#[derive(Debug, Args)]
pub struct KeyCreate {
    /// A name for the key (who or what uses it).
    pub name: String,
    /// Group to route through (default: "default").
    #[arg(long)]
    pub group: Option<String>,
    /// Allowed models: exact ids or prefixes ending in '*' (default: all).
    #[arg(long, value_name = "MODEL,...", value_delimiter = ',')]
    pub models: Vec<String>,
    /// When the key stops working (RFC 3339).
    #[arg(long, value_name = "RFC3339", value_parser = instant_arg)]
    pub expires: Option<i64>,
    #[command(flatten)]
    pub limits: LimitArgs,
}

#[derive(Debug, Args)]
pub struct KeyUpdate {
    /// The key's name or id.
    pub key: String,
    /// Rename the key.
    #[arg(long)]
    pub name: Option<String>,
    /// Route the key through another group.
    #[arg(long)]
    pub group: Option<String>,
    /// Replace the allowed models.
    #[arg(long, value_name = "MODEL,...", value_delimiter = ',', conflicts_with = "all_models")]
    pub models: Vec<String>,
    /// Allow every model again.
    #[arg(long)]
    pub all_models: bool,
    /// New expiry (RFC 3339), or `never`.
    #[arg(long, value_name = "RFC3339|never", value_parser = expiry_arg)]
    pub expires: Option<i64>,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Disable the key (reversible).
    #[arg(long, conflicts_with = "enable")]
    pub disable: bool,
    /// Enable a disabled key.
    #[arg(long)]
    pub enable: bool,
}

#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    /// Create a group; its limits are the total across its keys (also `add`).
    #[command(alias = "add")]
    Create(GroupCreate),
    /// List groups.
    #[command(alias = "ls")]
    List,
    /// Show one group.
    Show {
        /// The group's name or id.
        group: String,
    },
    /// Change a group (rename, description, limits, fallbacks); only the given fields change.
    Update(GroupUpdate),
    /// Delete a group (also `delete`, `remove`); refused while another group names it as a fallback.
    #[command(aliases = ["delete", "remove"])]
    Rm {
        /// The group's name or id.
        group: String,
    },
    /// Pause a group: its accounts serve nobody through it, its keys go straight to its fallbacks
    /// (or get an error saying the group is paused). Every data plane within a second.
    Pause {
        /// The group's name or id.
        group: String,
    },
    /// Resume a paused (or activated) group: back to normal.
    Resume {
        /// The group's name or id.
        group: String,
    },
    /// Activate a group: keys whose group falls back to it use it first, before their own group.
    Activate {
        /// The group's name or id.
        group: String,
    },
}

#[derive(Debug, Args)]
pub struct GroupCreate {
    /// A name for the group.
    pub name: String,
    /// What the group is for.
    #[arg(long, default_value = "")]
    pub description: String,
    /// Groups whose accounts serve this group's keys when none of its own can, in order
    /// (comma-separated or repeated).
    #[arg(long = "fallback", value_name = "GROUP", value_delimiter = ',')]
    pub fallbacks: Vec<String>,
    #[command(flatten)]
    pub limits: LimitArgs,
}

#[derive(Debug, Args)]
pub struct GroupUpdate {
    /// The group's name or id.
    pub group: String,
    /// Rename the group (its keys and accounts stay in it).
    #[arg(long)]
    pub name: Option<String>,
    /// A new description.
    #[arg(long)]
    pub description: Option<String>,
    /// Replace the fallback groups, in order (comma-separated or repeated; '' clears them).
    #[arg(
        long = "fallback",
        value_name = "GROUP",
        value_delimiter = ',',
        conflicts_with = "no_fallback"
    )]
    pub fallbacks: Option<Vec<String>>,
    /// Remove every fallback group.
    #[arg(long)]
    pub no_fallback: bool,
    #[command(flatten)]
    pub limits: LimitArgs,
}

#[derive(Debug, Subcommand)]
pub enum PricingCmd {
    /// List prices.
    #[command(alias = "ls")]
    List,
    /// Set the price of a model (or a prefix ending in '*'), in USD per million tokens.
    Set(PriceSet),
    /// Remove an operator's price of a pattern: every effective date, or the one given (also
    /// `delete`). Usage already recorded keeps its cost; built-in prices cannot be removed.
    #[command(aliases = ["delete", "remove"])]
    Rm(PriceRm),
}

#[derive(Debug, Args)]
pub struct PriceRm {
    /// The model pattern exactly as `pricing list` shows it (e.g. "claude-sonnet-4*").
    pub model_pattern: String,
    /// Only the price taking effect at this time (RFC 3339, as `pricing list -o json` shows it).
    #[arg(long, value_name = "RFC3339", value_parser = instant_arg)]
    pub effective_from: Option<i64>,
}

#[derive(Debug, Args)]
pub struct PriceSet {
    /// Exact model id, or a prefix ending in '*' (e.g. "claude-sonnet-4*").
    pub model_pattern: String,
    /// Input tokens, USD/MTok.
    #[arg(long, value_name = "USD", value_parser = usd_arg, alias = "input")]
    pub input_price: u64,
    /// Output tokens, USD/MTok (`--output` is the global output format).
    #[arg(long, value_name = "USD", value_parser = usd_arg)]
    pub output_price: u64,
    /// 5-minute cache writes, USD/MTok (default 1.25 × input).
    #[arg(long = "cache-write-5m-price", value_name = "USD", value_parser = usd_arg, alias = "cache-write-5m")]
    pub cache_write_5m_price: Option<u64>,
    /// 1-hour cache writes, USD/MTok (default 2 × input).
    #[arg(long = "cache-write-1h-price", value_name = "USD", value_parser = usd_arg, alias = "cache-write-1h")]
    pub cache_write_1h_price: Option<u64>,
    /// Cache reads, USD/MTok (default 0.1 × input).
    #[arg(long, value_name = "USD", value_parser = usd_arg, alias = "cache-read")]
    pub cache_read_price: Option<u64>,
    /// When the price takes effect (RFC 3339; default now).
    #[arg(long, value_name = "RFC3339", value_parser = instant_arg, alias = "effective")]
    pub effective_from: Option<i64>,
}

#[derive(Debug, Subcommand)]
pub enum SettingsCmd {
    /// List every setting: its value, default, type and range (-o json for every column).
    #[command(alias = "ls")]
    List,
    /// Set a setting (NAME, or account.ACCOUNT.NAME for a per-account one); refused unless it fits.
    Set {
        /// The setting (see `settings list`), or account.ACCOUNT.NAME.
        name: String,
        /// Its new value.
        value: String,
    },
    /// Show one setting: its value, default, type and range.
    Show {
        /// The setting (see `settings list`), or account.ACCOUNT.NAME.
        name: String,
    },
    /// Back to the default (also `rm`).
    #[command(aliases = ["rm", "delete", "remove"])]
    Unset {
        /// The setting (see `settings list`), or account.ACCOUNT.NAME.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProxiesCmd {
    /// List data planes.
    #[command(alias = "ls")]
    List,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// At most this many entries (server default 100).
    #[arg(long)]
    pub limit: Option<u32>,
    /// Only entries at or after this time (RFC 3339, or a duration ago like 24h).
    #[arg(long, value_name = "TIME", value_parser = time_arg)]
    pub since: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UsageBy {
    Key,
    Account,
    Model,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BucketArg {
    Hour,
    Day,
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Group rows by API key, account or model (default: one total).
    #[arg(long, value_enum)]
    pub by: Option<UsageBy>,
    /// From this time (RFC 3339, or a duration ago: 30m, 24h, 7d; default: everything stored).
    #[arg(long, value_name = "TIME", value_parser = time_arg)]
    pub since: Option<i64>,
    /// Up to this time (RFC 3339 or a duration ago; default now).
    #[arg(long, value_name = "TIME", value_parser = time_arg)]
    pub until: Option<i64>,
    /// Split rows into time buckets.
    #[arg(long, value_enum)]
    pub bucket: Option<BucketArg>,
}

/// Which requests a `requests` command covers.
#[derive(Debug, Args, Clone, Default)]
pub struct RequestFilterArgs {
    /// From this time (RFC 3339, or a duration ago: 30m, 24h, 7d; default: everything stored).
    #[arg(long, value_name = "TIME", value_parser = time_arg)]
    pub since: Option<i64>,
    /// Up to this time (RFC 3339 or a duration ago; default now).
    #[arg(long, value_name = "TIME", value_parser = time_arg)]
    pub until: Option<i64>,
    /// Only this API key's requests (name or id).
    #[arg(long, value_name = "NAME")]
    pub key: Option<String>,
    /// Only requests served while their key was in this group (name or id).
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
    /// Only requests with an attempt on this account (name or id).
    #[arg(long, value_name = "NAME")]
    pub account: Option<String>,
    /// Only this model (as billed: the answer's model id).
    #[arg(long, value_name = "MODEL")]
    pub model: Option<String>,
    /// Only requests that asked for this model (as the client's body named it).
    #[arg(long, value_name = "MODEL")]
    pub model_requested: Option<String>,
    /// ok, error, an HTTP status (429), a class (5xx), or an error type (overloaded_error, cancelled;
    /// one neither the Anthropic API nor relay uses is kept, with a note when nothing matched).
    #[arg(long, value_name = "STATUS")]
    pub status: Option<String>,
    /// Only streaming requests.
    #[arg(long, conflicts_with = "no_stream")]
    pub stream: bool,
    /// Only non-streaming requests.
    #[arg(long)]
    pub no_stream: bool,
    /// Only requests that took at least this long (e.g. 500ms, 2s, 1m).
    #[arg(long, value_name = "DURATION", value_parser = crate::parse::short_duration_ms)]
    pub min_duration: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum RequestsCmd {
    /// Requests, newest first (also `ls`).
    #[command(alias = "ls")]
    List {
        #[command(flatten)]
        filter: RequestFilterArgs,
        /// Records per page (at most 1000).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        /// Continue after a previous page (the cursor it printed on stderr).
        #[arg(long, value_name = "CURSOR", conflicts_with = "all")]
        cursor: Option<String>,
        /// Every matching record, page after page.
        #[arg(long)]
        all: bool,
    },
    /// One request: its attempts, timings, usage and cost (also `get`).
    #[command(alias = "get")]
    Show {
        /// relay's request id (the `request-id` header the client received).
        id: String,
    },
    /// Counts, error ratio, latency percentiles, tokens and cost over the filter, in total and by
    /// model, key and account.
    ///
    /// By account, each request counts once, under the account of its final attempt (the one that
    /// answered, or failed last; "" for a request that reached no account), so the rows add up to
    /// the total. `--account` filters differently: it keeps requests with any attempt on the
    /// account, so a request that failed over from it to another counts under the other.
    Stats {
        #[command(flatten)]
        filter: RequestFilterArgs,
    },
    /// Follow new requests as they are stored (until interrupted); JSON output is one object a line.
    Tail {
        #[command(flatten)]
        filter: RequestFilterArgs,
    },
    /// Every matching record to stdout as JSON lines (`-o jsonl`), newest first, optionally with
    /// its captured bodies and compressed.
    Export {
        #[command(flatten)]
        filter: RequestFilterArgs,
        /// Each record carries its capture document (`capture`, null when none was captured).
        #[arg(long)]
        with_bodies: bool,
        /// gzip the output.
        #[arg(long, conflicts_with = "zstd")]
        gzip: bool,
        /// zstd-compress the output.
        #[arg(long)]
        zstd: bool,
    },
    /// Delete the matching records (their usage rows) and captures; asks first unless --yes.
    /// Audited.
    Clear {
        #[command(flatten)]
        filter: RequestFilterArgs,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaptureCmd {
    /// Add a rule: requests matching every selector given are recorded in full (also `add`).
    #[command(alias = "add")]
    Create(CaptureAdd),
    /// The capture rules (also `ls`).
    #[command(alias = "ls")]
    List,
    /// Remove a rule by id (or a unique start of it) (also `delete`, `remove`).
    #[command(aliases = ["delete", "remove"])]
    Rm {
        /// The rule's id, or a unique start of it.
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct CaptureAdd {
    /// Only this API key's requests (name or id).
    #[arg(long, value_name = "NAME")]
    pub key: Option<String>,
    /// Only requests of the keys in this group (name or id).
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
    /// Only requests that an attempt sent to this account (name or id).
    #[arg(long, value_name = "NAME")]
    pub account: Option<String>,
    /// Only this model (an exact id, or a prefix ending in '*').
    #[arg(long, value_name = "MODEL")]
    pub model: Option<String>,
    /// Only requests that end in an error (decided when the answer ends).
    #[arg(long)]
    pub errors_only: bool,
    /// The share of matching requests recorded (0 < RATE <= 1; default 1).
    #[arg(long, value_name = "RATE")]
    pub sample: Option<f64>,
    /// The most bytes kept of each body (e.g. 65536, 256KiB, 1MiB; default 256KiB, at most 4MiB);
    /// the rest is cut and the capture marked truncated.
    #[arg(long, value_name = "N", value_parser = crate::parse::byte_size)]
    pub max_bytes: Option<u64>,
    /// Remove captures this long after they were taken (e.g. 24h, 7d; default: with the request log).
    #[arg(long, value_name = "DURATION", value_parser = crate::parse::short_duration_ms)]
    pub ttl: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    Admin,
    ReadOnly,
    DataPlane,
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create an admin, read-only or data-plane token; printed this once (also `add`).
    #[command(alias = "add")]
    Create {
        /// A name for the token (who or what uses it).
        name: String,
        /// admin: everything; read-only: lists and reports; data-plane: only Watch and Report (what a
        /// data plane needs).
        #[arg(long, value_enum)]
        role: RoleArg,
    },
    /// List tokens and where each came from.
    #[command(alias = "ls")]
    List,
    /// Revoke a token (by name or id) (also `rm`, `delete`).
    #[command(aliases = ["rm", "delete", "remove"])]
    Revoke {
        // Not `token`: that is the global --token option's id, and clap would
        // mix the two up when the admin token comes from --token or the env.
        /// The token's name or id.
        #[arg(value_name = "NAME")]
        name: String,
    },
}

/// A tip for a usage error people make often: `pricing set … --output 2` meant the output price
/// (`--output` is the global output format).
pub fn parse_error_tip(err: &clap::Error, argv: &[String]) -> Option<&'static str> {
    let is_format = err.kind() == clap::error::ErrorKind::InvalidValue && err.to_string().contains("<FORMAT>");
    (is_format && argv.iter().any(|a| a == "pricing")).then_some(
        "the price of output tokens is --output-price; -o/--output is the output format (table, wide, json, csv)",
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("relayctl").chain(args.iter().copied()))
    }

    #[test]
    fn token_revoke_takes_a_name_beside_the_admin_token() {
        let cli = parse(&["--token", "rat-admin", "token", "revoke", "ops"]).unwrap();
        assert_eq!(cli.token.as_deref(), Some("rat-admin"));
        let Command::Token(TokenCmd::Revoke { name }) = cli.command else {
            unreachable!()
        };
        assert_eq!(name, "ops");
    }

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn account_add_needs_a_secret_source() {
        assert!(parse(&["account", "add", "a", "--kind", "anthropic-api-key"]).is_err());
        assert!(parse(&[
            "account",
            "add",
            "a",
            "--kind",
            "anthropic-api-key",
            "--secret-stdin",
            "--secret-file",
            "f"
        ])
        .is_err());
        let cli = parse(&[
            "account",
            "add",
            "a",
            "--kind",
            "claude-oauth",
            "--secret-file",
            "f",
            "--group",
            "x,y",
            "--group",
            "z",
            "--priority",
            "-2",
        ])
        .unwrap();
        let Command::Account(AccountCmd::Create(a)) = cli.command else {
            unreachable!()
        };
        assert_eq!(a.groups, ["x", "y", "z"]);
        assert_eq!(a.priority, Some(-2));
        assert_eq!(a.kind, AccountKindArg::ClaudeOauth);
    }

    #[test]
    fn no_secret_argument_exists() {
        assert!(parse(&["account", "add", "a", "--kind", "anthropic-api-key", "--secret", "sk"]).is_err());
    }

    #[test]
    fn global_flags_anywhere() {
        let cli = parse(&["key", "list", "-o", "json", "--server", "cp:1"]).unwrap();
        assert_eq!(cli.output, Format::Json);
        assert_eq!(cli.server, "cp:1");
        assert!(parse(&["-o", "yaml", "key", "list"]).is_err());
    }

    #[test]
    fn prices_parse_exactly() {
        let cli = parse(&[
            "pricing",
            "set",
            "claude-*",
            "--input-price",
            "3",
            "--output-price",
            "15",
            "--cache-read-price",
            "0.30",
        ])
        .unwrap();
        let Command::Pricing(PricingCmd::Set(p)) = cli.command else {
            unreachable!()
        };
        assert_eq!(
            (
                p.input_price,
                p.output_price,
                p.cache_read_price,
                p.cache_write_5m_price
            ),
            (3_000_000, 15_000_000, Some(300_000), None)
        );
        let err = parse(&["pricing", "set", "m", "--input-price", "abc", "--output-price", "1"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(parse(&["pricing", "set", "m", "--input-price", "-1", "--output-price", "1"]).is_err());
        // The global `-o/--output` is the output format, before or after the subcommand.
        let set = ["pricing", "set", "m", "--input-price", "1", "--output-price", "2"];
        for (extra, want) in [
            (&["-o", "json"][..], Format::Json),
            (&["--output", "csv"][..], Format::Csv),
            (&["--output=wide"][..], Format::Wide),
        ] {
            let mut args = set.to_vec();
            args.extend_from_slice(extra);
            assert_eq!(parse(&args).unwrap().output, want, "{args:?}");
            let mut args = extra.to_vec();
            args.extend_from_slice(&set);
            assert_eq!(parse(&args).unwrap().output, want, "{args:?}");
        }
        // `--output 2` is a format, not a price, any more: the error comes with the flag to use.
        let argv = ["relayctl", "pricing", "set", "m", "--input-price", "1", "--output", "2"];
        let err = parse(&argv[1..]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::InvalidValue, "{err}");
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        assert!(parse_error_tip(&err, &argv).unwrap().contains("--output-price"));
        let other = parse(&["key", "list", "-o", "yaml"]).unwrap_err();
        let argv: Vec<String> = ["relayctl", "key", "list", "-o", "yaml"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(parse_error_tip(&other, &argv), None);
        // The old names of the other prices still work.
        let cli = parse(&[
            "pricing",
            "set",
            "m",
            "--input",
            "1",
            "--output-price",
            "2",
            "--cache-write-5m",
            "1.5",
            "--effective",
            "2025-01-01T00:00:00Z",
        ])
        .unwrap();
        let Command::Pricing(PricingCmd::Set(p)) = cli.command else {
            unreachable!()
        };
        assert_eq!(
            (p.input_price, p.cache_write_5m_price, p.effective_from),
            (1_000_000, Some(1_500_000), Some(1_735_689_600_000))
        );
        let cli = parse(&["--output", "json", "pricing", "list"]).unwrap();
        assert_eq!(cli.output, Format::Json);
    }

    #[test]
    fn pricing_rm_takes_a_pattern_and_an_optional_date() {
        let cli = parse(&["pricing", "rm", "claude-*", "--effective-from", "2025-01-01T00:00:00Z"]).unwrap();
        let Command::Pricing(PricingCmd::Rm(r)) = cli.command else {
            unreachable!()
        };
        assert_eq!(
            (r.model_pattern.as_str(), r.effective_from),
            ("claude-*", Some(1_735_689_600_000))
        );
        let cli = parse(&["pricing", "delete", "m", "-o", "json"]).unwrap();
        assert_eq!(cli.output, Format::Json);
        assert!(matches!(
            cli.command,
            Command::Pricing(PricingCmd::Rm(PriceRm {
                effective_from: None,
                ..
            }))
        ));
        assert!(parse(&["pricing", "rm"]).is_err());
        assert!(parse(&["pricing", "rm", "m", "--effective-from", "yesterday"]).is_err());
    }

    /// One verb per action on every resource: `create` (alias `add`), `rm` or `revoke` (aliases
    /// `delete`, `remove`, and `rm` for a revoke), `update`, `show`, `list` (alias `ls`).
    #[test]
    fn verbs_are_the_same_on_every_resource() {
        let cli = Cli::command();
        let mut seen = 0;
        for res in cli.get_subcommands() {
            let verbs: Vec<&str> = res.get_subcommands().map(|c| c.get_name()).collect();
            for sub in res.get_subcommands() {
                let name = sub.get_name();
                let aliases: Vec<&str> = sub.get_all_aliases().collect();
                let want: &[&str] = match name {
                    "create" => &["add"],
                    "rm" => &["delete", "remove"],
                    "revoke" => &["rm", "delete", "remove"],
                    "unset" => &["rm", "delete", "remove"],
                    "list" => &["ls"],
                    _ => &[],
                };
                for a in want {
                    assert!(
                        aliases.contains(a),
                        "{} {name}: no alias {a} ({aliases:?})",
                        res.get_name()
                    );
                }
                for other in ["add", "delete", "remove", "ls", "new", "edit", "get", "describe"] {
                    assert_ne!(name, other, "{}: `{other}` should be an alias", res.get_name());
                }
            }
            if !verbs.is_empty() {
                seen += 1;
                assert!(verbs.contains(&"list"), "{}: no list ({verbs:?})", res.get_name());
            }
        }
        assert!(seen >= 7, "every resource was checked");
        for (resource, verbs) in [
            ("account", &["create", "list", "show", "update", "rm"][..]),
            ("key", &["create", "list", "show", "update", "revoke"]),
            ("group", &["create", "list", "show", "update", "rm"]),
            ("pricing", &["list", "set", "rm"]),
            ("settings", &["list", "show", "set", "unset"]),
            ("token", &["create", "list", "revoke"]),
            ("data-planes", &["list"]),
            ("notify", &["list", "test"]),
        ] {
            let res = cli.find_subcommand(resource).unwrap();
            for v in verbs {
                assert!(res.find_subcommand(v).is_some(), "{resource} {v}");
            }
        }
        // The aliases parse to the same commands.
        for args in [
            &["account", "add", "a", "--kind", "anthropic-api-key", "--secret-stdin"][..],
            &["account", "remove", "a"],
            &["key", "add", "k"],
            &["key", "rm", "k"],
            &["group", "delete", "g"],
            &["pricing", "remove", "m"],
            &["settings", "rm", "retry.max_attempts"],
            &["token", "add", "t", "--role", "admin"],
            &["token", "delete", "t"],
            &["dp", "ls"],
        ] {
            assert!(parse(args).is_ok(), "{args:?}");
        }
    }

    #[test]
    fn key_update_flags() {
        let cli = parse(&[
            "key",
            "update",
            "k",
            "--expires",
            "never",
            "--models",
            "a,b*",
            "--disable",
            "--daily-budget",
            "12.5",
        ])
        .unwrap();
        let Command::Key(KeyCmd::Update(u)) = cli.command else {
            unreachable!()
        };
        assert_eq!(u.expires, Some(0));
        assert_eq!(u.models, ["a", "b*"]);
        assert!(u.disable && !u.enable);
        assert_eq!(u.limits.daily_budget, Some(12_500_000));
        assert!(parse(&["key", "update", "k", "--disable", "--enable"]).is_err());
    }

    #[test]
    fn limit_flags_are_shared_and_refuse_bad_values_clearly() {
        let cli = parse(&["group", "create", "team", "--rpm", "600", "--monthly-budget", "1000"]).unwrap();
        let Command::Group(GroupCmd::Create(g)) = cli.command else {
            unreachable!()
        };
        assert_eq!(
            (g.limits.rpm, g.limits.monthly_budget),
            (Some(600), Some(1_000_000_000))
        );
        assert!(parse(&["group", "add", "team"]).is_ok(), "`add` still works");
        let cli = parse(&["group", "update", "team", "--name", "team-b", "--daily-budget", "0"]).unwrap();
        let Command::Group(GroupCmd::Update(u)) = cli.command else {
            unreachable!()
        };
        assert_eq!((u.name.as_deref(), u.limits.daily_budget), (Some("team-b"), Some(0)));
        for cmd in [["key", "create", "k"], ["key", "update", "k"], ["group", "update", "g"]] {
            for (flag, bad, says) in [
                ("--rpm", "-5", "cannot be negative"),
                ("--tpm", "lots", "whole number of tokens per minute"),
                ("--concurrency", "2.5", "whole number of concurrent requests"),
                ("--daily-budget", "-1", "expected an amount in USD such as 5 or 12.50"),
                (
                    "--monthly-budget",
                    "ten",
                    "expected an amount in USD such as 5 or 12.50",
                ),
            ] {
                let mut args = cmd.to_vec();
                args.extend([flag, bad]);
                let err = parse(&args).unwrap_err();
                assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{args:?}: {err}");
                let text = err.to_string();
                assert!(text.contains(flag) && text.contains(says), "{args:?}: {text}");
            }
        }
    }

    /// Weight 0 was taken silently as 1: it is refused with what to do instead.
    #[test]
    fn weight_zero_is_refused_with_what_to_do() {
        for cmd in [
            &["account", "add", "a", "--kind", "anthropic-api-key", "--secret-stdin"][..],
            &["account", "update", "a"],
            &["account", "login", "a"],
        ] {
            let mut args = cmd.to_vec();
            args.extend(["--weight", "0"]);
            let err = parse(&args).unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{args:?}");
            let text = err.to_string();
            assert!(
                text.contains("weight 0 is not a weight") && text.contains("relayctl account disable"),
                "{args:?}: {text}"
            );
            for (bad, says) in [("-1", "whole number in 1..=10000"), ("10001", "at most 10000")] {
                let mut args = cmd.to_vec();
                args.extend(["--weight", bad]);
                let text = parse(&args).unwrap_err().to_string();
                assert!(text.contains(says), "{args:?}: {text}");
            }
            let mut args = cmd.to_vec();
            args.extend(["--weight", "10000"]);
            assert!(parse(&args).is_ok(), "{args:?}");
        }
    }

    #[test]
    fn group_fallbacks_and_states() {
        let cli = parse(&["group", "create", "a", "--fallback", "b,c", "--fallback", "d"]).unwrap();
        let Command::Group(GroupCmd::Create(g)) = cli.command else {
            unreachable!()
        };
        assert_eq!(g.fallbacks, ["b", "c", "d"]);
        let fallbacks = |args: &[&str]| match parse(args).unwrap().command {
            Command::Group(GroupCmd::Update(u)) => (u.fallbacks, u.no_fallback),
            _ => unreachable!(),
        };
        assert_eq!(
            fallbacks(&["group", "update", "a", "--fallback", "c,b"]),
            (Some(vec!["c".to_string(), "b".to_string()]), false)
        );
        assert_eq!(
            fallbacks(&["group", "update", "a", "--fallback", ""]),
            (Some(vec![String::new()]), false)
        );
        assert_eq!(fallbacks(&["group", "update", "a", "--no-fallback"]), (None, true));
        assert_eq!(fallbacks(&["group", "update", "a", "--name", "x"]), (None, false));
        assert!(parse(&["group", "update", "a", "--fallback", "b", "--no-fallback"]).is_err());
        for verb in ["pause", "resume", "activate"] {
            assert!(parse(&["group", verb, "a"]).is_ok(), "{verb}");
            assert!(parse(&["group", verb]).is_err(), "{verb} needs a group");
        }
    }

    #[test]
    fn usage_and_roles() {
        let cli = parse(&["usage", "--by", "model", "--since", "7d", "--bucket", "day"]).unwrap();
        let Command::Usage(u) = cli.command else { unreachable!() };
        assert_eq!(u.by, Some(UsageBy::Model));
        assert!(u.since.is_some());
        assert!(parse(&["usage", "--since", "tomorrow"]).is_err());
        let cli = parse(&["token", "create", "ci", "--role", "read-only"]).unwrap();
        let Command::Token(TokenCmd::Create { role, .. }) = cli.command else {
            unreachable!()
        };
        assert_eq!(role, RoleArg::ReadOnly);
        assert!(parse(&["token", "create", "dp", "--role", "data-plane"]).is_ok());
    }
}

#[cfg(test)]
mod help_tests {
    use super::*;
    use clap::CommandFactory;

    /// Every command and every argument says what it is for in `--help`.
    #[test]
    fn every_command_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                let p = format!("{path} {}", sub.get_name());
                if sub.get_name() != "help" && sub.get_about().is_none() {
                    missing.push(format!("{p} (command)"));
                }
                walk(sub, &p, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "relayctl", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }

    /// `usage --help` says which time window it reports when given none.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn usage_help_says_the_default_window() {
        let mut cmd = Cli::command();
        let usage = cmd.find_subcommand_mut("usage").unwrap();
        let help = usage.render_long_help().to_string();
        assert!(help.contains("default: everything stored"), "{help}");
        assert!(help.contains("default now"), "{help}");
    }

    #[test]
    fn completions_cover_every_command_and_the_data_planes_name() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "relayctl", &mut script);
            let text = String::from_utf8_lossy(&script);
            for word in ["account", "data-planes", "settings", "completions", "secret-stdin"] {
                assert!(text.contains(word), "{shell}: no {word}");
            }
        }
        // `proxies` still works.
        let cli = Cli::try_parse_from(["relayctl", "proxies", "list"]);
        assert!(matches!(cli.map(|c| c.command), Ok(Command::Proxies(_))));
    }
}
