//! The SM (core) cap: `CUDA_DEVICE_SM_LIMIT[_<i>]` percent of each device's time for the whole
//! container, on every launch path (`cuLaunchKernel`, `cuLaunchKernelEx`,
//! `cuLaunchCooperativeKernel`, `cuGraphLaunch`, each with its `_ptsz` twin). Start at [`launch`].
//!
//! Order of use inside (no circle): [`config`] (parsing), [`controller`], [`gate`] and [`period`]
//! (pure), [`hostpid`] → [`shared`] (caps, gates and the region cached for launches) → [`watcher`] →
//! [`launch`].

pub(crate) mod config;
pub(crate) mod controller;
pub(crate) mod gate;
pub(crate) mod hostpid;
pub(crate) mod launch;
pub(crate) mod period;
pub(crate) mod shared;
pub(crate) mod watcher;
