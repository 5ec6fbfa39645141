//! Reinforcement-learning pieces: the GRPO loss family and group-relative advantages
//! (`policy_loss`), as specified in `../shared/reference/study.md` ("GRPO as the field
//! implements it").

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod policy_loss;
pub mod sources;
pub mod task;
pub mod trainer;

pub use policy_loss::{
    group_advantages, policy_loss, policy_loss_and_grad, LossType, PolicyLossConfig,
    PolicyLossInputs, ScaleRewards,
};
