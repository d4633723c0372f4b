//! AdamW with its state in the open. The update is candle_nn's `AdamW` step for step
//! (same formula, same order of operations; a test holds them equal), but its moments
//! and step count can be written to a checkpoint and read back, which candle_nn keeps
//! private; without them a resumed run would not continue the same optimisation.

use candle_core::{Tensor, Var};
pub use candle_nn::ParamsAdamW;

pub struct AdamW {
    vars: Vec<Var>,
    first_moments: Vec<Tensor>,
    second_moments: Vec<Tensor>,
    step: usize,
    params: ParamsAdamW,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, params: ParamsAdamW) -> candle_core::Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let first_moments = vars.iter().map(zeros).collect::<candle_core::Result<_>>()?;
        let second_moments = vars.iter().map(zeros).collect::<candle_core::Result<_>>()?;
        Ok(Self { vars, first_moments, second_moments, step: 0, params })
    }

    /// Steps taken.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// One update with `grads[i]` the gradient of `vars[i]` (`None`: untouched).
    pub fn step(&mut self, grads: &[Option<Tensor>]) -> candle_core::Result<()> {
        self.step += 1;
        let p = &self.params;
        let (lr, beta1, beta2) = (p.lr, p.beta1, p.beta2);
        let lr_lambda = lr * p.weight_decay;
        let scale_m = 1f64 / (1f64 - beta1.powi(self.step as i32));
        let scale_v = 1f64 / (1f64 - beta2.powi(self.step as i32));
        for (i, theta) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(i).and_then(Option::as_ref) else { continue };
            let next_m = ((&self.first_moments[i] * beta1)? + (g * (1.0 - beta1))?)?;
            let next_v = ((&self.second_moments[i] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let m_hat = (&next_m * scale_m)?;
            let v_hat = (&next_v * scale_v)?;
            let next_theta = (theta.as_tensor() * (1f64 - lr_lambda))?;
            let adjusted_grad = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
            let next_theta = (next_theta - (adjusted_grad * lr)?)?;
            self.first_moments[i] = next_m;
            self.second_moments[i] = next_v;
            theta.set(&next_theta)?;
        }
        Ok(())
    }

    /// (first moments, second moments) in the order of the variables.
    pub fn moments(&self) -> (&[Tensor], &[Tensor]) {
        (&self.first_moments, &self.second_moments)
    }

    /// Restores the state written by [`AdamW::moments`] and [`AdamW::step_count`].
    pub fn restore(&mut self, step: usize, first: Vec<Tensor>, second: Vec<Tensor>) -> candle_core::Result<()> {
        if first.len() != self.vars.len() || second.len() != self.vars.len() {
            candle_core::bail!("optimizer state holds {} tensors for {} variables", first.len(), self.vars.len());
        }
        for (i, var) in self.vars.iter().enumerate() {
            if first[i].dims() != var.dims() || second[i].dims() != var.dims() {
                candle_core::bail!("optimizer state of variable {i} has the wrong shape");
            }
        }
        self.step = step;
        self.first_moments = first;
        self.second_moments = second;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use candle_nn::Optimizer;

    #[test]
    fn same_updates_as_candle_nn_adamw() {
        let params = ParamsAdamW { lr: 0.05, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
        let init = Tensor::new(&[[0.5f32, -1.0, 2.0], [0.1, 0.0, -0.3]], &Device::Cpu).unwrap();
        let (ours, theirs) = (Var::from_tensor(&init).unwrap(), Var::from_tensor(&init).unwrap());
        let mut a = AdamW::new(vec![ours.clone()], params.clone()).unwrap();
        let mut b = candle_nn::AdamW::new(vec![theirs.clone()], params).unwrap();
        for step in 0..6 {
            // loss = Σ (θ·c)², a gradient that changes with θ.
            let c = Tensor::new(&[[1.0f32, 2.0, -1.0], [0.5, -3.0, 1.5]], &Device::Cpu).unwrap().affine(1.0 + step as f64, 0.0).unwrap();
            let ga = (ours.as_tensor() * &c).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
            a.step(&[ga.get(ours.as_tensor()).cloned()]).unwrap();
            let gb = (theirs.as_tensor() * &c).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
            b.step(&gb).unwrap();
            assert_eq!(ours.as_tensor().to_vec2::<f32>().unwrap(), theirs.as_tensor().to_vec2::<f32>().unwrap(), "step {step}");
        }
        assert_eq!(a.step_count(), 6);
    }
}
