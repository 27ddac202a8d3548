//! Layered settings on clap alone: built-in defaults < TOML file < `WEFT_*`
//! environment < command-line flags, for any struct that is both
//! `serde::Deserialize` (its TOML table) and `clap::Args` (its flags and
//! variables).
//!
//! Each field says its default once, in its `#[arg(default_value...)]`
//! attribute (a named constant). [`builtin`] reads those defaults back, so a
//! struct's `Default` (which `#[serde(default)]` fills missing keys from) is
//! the same table `--help` shows. [`Overrides`] keeps only what the command
//! line or the environment actually set (clap's `ValueSource`), and
//! [`Overrides::apply`] writes exactly those fields over the file's values.
//!
//! Why not figment or config-rs: both merge a provider per layer by key,
//! and clap's own defaults would then win over the file (every parsed flag
//! has a value). weft's variable names are flat and fixed (`WEFT_BACKEND`
//! sets `mesh.backend`, `WEFT_NO_DNS` clears `dns.enabled`), which clap
//! already knows per field; a key-mapping `Env` provider would spell them a
//! second time.

use std::marker::PhantomData;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, Command, FromArgMatches};

/// The built-in defaults of a settings struct: every field's
/// `default_value` (nothing from the environment, no flags).
///
/// # Panics
/// If a field of `T` has neither a default nor an `Option` type (a bug in
/// the struct's attributes; every settings struct's unit tests build it).
pub fn builtin<T: Args + FromArgMatches>() -> T {
    let cmd = T::augment_args(Command::new("defaults").no_binary_name(true))
        .mut_args(|a| a.env(None::<&str>));
    match cmd
        .try_get_matches_from(std::iter::empty::<&str>())
        .and_then(|m| T::from_arg_matches(&m))
    {
        Ok(t) => t,
        Err(e) => panic!("a setting has no built-in default: {e}"),
    }
}

/// What the command line and the environment set for `T`'s fields (not
/// clap's defaults): the top two layers.
pub struct Overrides<T> {
    given: ArgMatches,
    _for: PhantomData<fn() -> T>,
}

impl<T> Clone for Overrides<T> {
    fn clone(&self) -> Self {
        Overrides {
            given: self.given.clone(),
            _for: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for Overrides<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.given.ids().map(|id| id.as_str()).collect();
        f.debug_struct("Overrides").field("given", &ids).finish()
    }
}

impl<T> Default for Overrides<T> {
    /// Nothing given.
    fn default() -> Self {
        Overrides {
            given: ArgMatches::default(),
            _for: PhantomData,
        }
    }
}

impl<T: Args + FromArgMatches> Overrides<T> {
    /// Writes the given fields over `base` (defaults and the file).
    pub fn apply(&self, base: &mut T) -> Result<(), clap::Error> {
        if self.given.ids().next().is_none() {
            return Ok(());
        }
        base.update_from_arg_matches(&self.given)
    }

    /// Parses `args` (flags only, no program name) with the environment:
    /// what a subcommand would see. For tests and tools.
    pub fn parse_from<I, S>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString> + Clone,
    {
        let cmd = T::augment_args(Command::new("netd").no_binary_name(true));
        Self::from_arg_matches(&cmd.try_get_matches_from(args)?)
    }
}

/// Only values from the command line or the environment stay.
fn given_only(m: &ArgMatches) -> Result<ArgMatches, clap::Error> {
    let mut given = m.clone();
    for id in m.ids() {
        let id = id.as_str();
        if !matches!(
            m.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            given
                .try_clear_id(id)
                .map_err(|e| clap::Error::raw(clap::error::ErrorKind::InvalidValue, e))?;
        }
    }
    Ok(given)
}

impl<T: Args> Args for Overrides<T> {
    fn augment_args(cmd: Command) -> Command {
        T::augment_args(cmd)
    }
    fn augment_args_for_update(cmd: Command) -> Command {
        T::augment_args_for_update(cmd)
    }
    fn group_id() -> Option<clap::Id> {
        T::group_id()
    }
}

impl<T> FromArgMatches for Overrides<T> {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(Overrides {
            given: given_only(m)?,
            _for: PhantomData,
        })
    }
    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        self.given = given_only(m)?;
        Ok(())
    }
}
