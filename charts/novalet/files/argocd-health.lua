-- Argo CD health check for novalet.io/VirtualInstance (Lua 5.1, as Argo CD's gopher-lua).
-- Install it under `resource.customizations.health.novalet.io_VirtualInstance` in argocd-cm
-- (docs/operations.md). It reads the kstatus conditions the agent writes: Ready is True only
-- when the spec is met and nothing is in flight, and its reason says why not.
local hs = {}

local function condition(kind)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

-- reasons for Ready=False that no waiting mends: a person has to act
local broken = {
  Error = true, HostAgentUnavailable = true, DomainMissing = true, PowerStateMismatch = true,
}

if obj.status == nil or obj.status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for a node's agent to take the instance"
  return hs
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the agent to act on generation " .. obj.metadata.generation
  return hs
end

local ready, stalled = condition("Ready"), condition("Stalled")
local last = obj.status.lastAction
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = stalled.message
elseif ready == nil then
  hs.status = "Progressing"
  hs.message = "No Ready condition yet"
elseif ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message
elseif broken[ready.reason] then
  hs.status = "Degraded"
  hs.message = ready.message
elseif ready.reason == "ResizeNotConfirmed" then
  hs.status = "Suspended"
  hs.message = ready.message
elseif ready.reason == "SpecNotMet" and last ~= nil and (last.result == "Rejected" or last.result == "Failed")
    and string.find(last.id, "spec-g" .. tostring(obj.metadata.generation) .. "-", 1, true) == 1 then
  -- this very spec was refused or failed (its request id names the generation)
  hs.status = "Degraded"
  hs.message = ready.message
else
  hs.status = "Progressing"
  hs.message = ready.message
end
return hs
